"""Data-parallel training (noclone.training.distributed): two CPU processes under `accelerate launch` (gloo) train
the weights one process trains at the same global batch, and only the first process writes.

The test launches two processes once with `accelerate launch --multi_gpu --num_processes 2` (accelerate's torchrun
launcher: on a CPU-only torch the processes join over gloo; `--cpu` would start one process only, accelerate's
multi-CPU launch is mpirun) and computes the one-process reference here meanwhile, at twice the per-process batch.
This file is also the launched worker (`__main__` below); its LoRA run goes through `python -m noclone.cli personalize`,
what `accelerate launch -m noclone.cli personalize` runs in each process, and it first checks the loop's contract on a
toy problem whose arithmetic is exact (`_check_loop_contract`) and PersGuard's persistent attackers spread over the
processes (`_check_attacker_states`). APDM runs `--multi-subject sum` on two subjects, one per process: there the
processes split whole subjects rather than a batch, and the check is the same (plus the gradient each step applied,
which AdamW's steps would not show scaled wrong). PersGuard runs the same way (`sum`, two subjects, UNet implant) with
persistent simulated attackers, one per subject and process, killed and resumed from the checkpoint that gathers them.

Tolerance. The processes draw the same global batch (same seeds: same samples, noise and timesteps), so the only
difference from one process is fp32 summation order: the UNet runs on 2 + 2 samples instead of 4, the loss is the
mean of two half-batch means, the gradients are summed over processes and halved. That changes gradients by a few
ulps. AdamW turns a gradient into a step of about lr x g / (|g| + eps) per element: insensitive to a relative error
in g, except where g itself is rounding noise (e.g. the text encoder's key-projection biases, whose gradient is zero
in exact arithmetic, and cancelling sums in the convolutions): there an ulp flips the sign of a step of up to lr.
Measured here (DreamBooth, lr 1e-3, 4 steps): 0.06 % of the weights differ by more than 1e-6, the largest by 1.9e-4;
one process at 1 vs 2 threads differs the same way (max 1.9e-5 after one step). So the check is: fewer than 0.5 % of
the elements differ by more than 1e-6, none by more than lr x steps / 4 (a sign flip on a few steps), the recorded
losses agree to 1e-4 relative, and, as a negative control, one process at the per-process batch (2, not 4) fails
that check by far (34 % of the elements differ, the largest by 8e-3).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

LAUNCH_TIMEOUT_S = 240
PER_PROCESS_BATCH = 2
PROCESSES = 2
RID_STEPS, RID_LR = 3, 3e-3
LORA_STEPS, LORA_LR = 3, 1e-3
APDM_STEPS, APDM_LR = 2, 1e-3
PERSGUARD_STEPS, PERSGUARD_LR = 2, 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_launch(args: list[str], tmp_path: Path) -> subprocess.Popen:
    """`accelerate launch` two CPU processes (in the background: the one-process reference runs meanwhile)."""
    # CPU processes over gloo even where GPUs are (the models here are on the CPU); no user accelerate config
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *args]
    # its own process group, so that a timeout or a failure here kills the workers too
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _finish_launch(proc: subprocess.Popen, started: float) -> str:
    """Wait for the launch (at most LAUNCH_TIMEOUT_S from `started`); its output, or the test fails with it."""
    try:
        out, _ = proc.communicate(timeout=max(1.0, LAUNCH_TIMEOUT_S - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"2-process launch timed out after {LAUNCH_TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"2-process launch failed (rc {proc.returncode}):\n{out[-6000:]}"
    print(f"2-process launch: {time.perf_counter() - started:.1f} s")
    return out


def _differences(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(share of the elements differing by more than 1e-6, largest difference)."""
    assert set(one) == set(two) and one
    diffs = torch.cat([(one[n].float() - two[n].float()).abs().flatten() for n in sorted(one)])
    return float((diffs > 1e-6).float().mean()), float(diffs.max())


def _same_training(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], lr: float, steps: int) -> bool:
    share, worst = _differences(one, two)
    print(f"differing elements {share:.2e}, largest difference {worst:.2e} (bound {lr * steps / 4:.1e})")
    return share < 0.005 and worst <= lr * steps / 4


def _pipeline_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for part in ("unet", "text_encoder"):
        for f in sorted((folder / part).glob("*.safetensors")):
            weights.update({f"{part}.{k}": v for k, v in load_file(str(f)).items()})
    return weights


# ---------------------------------------------------------------- the scenarios (run here and in the workers)

def _db_config(batch: int, **kw):
    from noclone.attacks import PersonalizationConfig

    return PersonalizationConfig(**{**dict(class_noun="person", steps=4, batch_size=batch, num_class_images=2,
                                           class_image_steps=2, checkpoint_every=2, progress=False, lr=1e-3,
                                           train_text_encoder=True), **kw})


def _rid_images():
    from noclone.cloak.rid import sandbox_training_images

    return sandbox_training_images(2, photos=2, size=32)


def _apdm_config():
    """Two outer steps of L2P with two inner steps, gradients averaged over the 2 x 2 terms ('mean') and not clipped:
    the gradient each step applies is then exactly the one-process gradient (recorded and compared). Class images as
    DreamBooth's above (one cache)."""
    from noclone.defenses import APDMConfig

    return APDMConfig(outer_steps=APDM_STEPS, inner_steps=2, batch_size=2, num_class_images=2, class_image_steps=2,
                      lr_protect=APDM_LR, lr_per=APDM_LR, checkpoint_every=1, progress=False, multi_subject="sum",
                      accumulate="mean", max_grad_norm=None)


def _run_apdm(model_dir: Path, subject_dir: Path, out: Path) -> None:
    """APDM on two subjects (the same photos under two identifiers: two subjects whose class images are cached)
    through `run`; the main process also records each step's applied gradient norm."""
    from noclone.defenses import APDM, ProtectionSubject
    from noclone.models.pipeline import load_pipeline
    from noclone.training.distributed import current

    pipe = load_pipeline(model_dir)
    norms: list[float] = []

    class Recording(APDM):
        def after_step(self, step: int) -> None:  # .grad is what the step applied: averaged, unclipped
            norms.append(float(sum(p.grad.double().pow(2).sum() for p in pipe.unet.parameters()
                                   if p.grad is not None) ** 0.5))

    subjects = [ProtectionSubject.from_folder(subject_dir, "person", token) for token in ("sks", "zwx")]
    Recording(_apdm_config()).run(pipe, subjects, out / "apdm")
    if current().is_main:
        (out / "apdm_grad_norms.json").write_text(json.dumps(norms))


def _persguard_config():
    """Two outer steps of PersGuard on the UNet (pattern backdoor: no target images to generate), every subject every
    step ('sum'), persistent simulated attackers (`br_horizon`) checkpointed after each step, gradients clipped as by
    default. Class images as DreamBooth's above (one cache)."""
    from noclone.defenses.persguard import PersGuardConfig

    return PersGuardConfig(steps=PERSGUARD_STEPS, inner_steps=2, br_horizon=4, batch_size=2, num_class_images=2,
                           class_image_steps=2, lr=PERSGUARD_LR, lr_per=PERSGUARD_LR, checkpoint_every=1,
                           progress=False, multi_subject="sum", implant="unet")


def _run_persguard(model_dir: Path, subject_dir: Path, out: Path, launched: bool) -> None:
    """PersGuard on two subjects (the same photos under two identifiers, as APDM's) through `run`. `launched`: the
    run is killed in its last step's hook, before that step's checkpoint (the one on disk is step 1's, with both
    attackers, each gathered from its owner), and rerun, resuming: each process's attacker comes back from the main
    process's checkpoint."""
    from noclone.defenses import ProtectionSubject
    from noclone.defenses.persguard import PersGuard
    from noclone.models.pipeline import load_pipeline

    subjects = [ProtectionSubject.from_folder(subject_dir, "person", token) for token in ("sks", "zwx")]
    if launched:
        class Killed(PersGuard):
            def after_step(self, step: int) -> None:
                if step == 1:  # on every process: the checkpoint of step 1 is the main process's
                    raise KeyboardInterrupt

        try:
            Killed(_persguard_config()).run(load_pipeline(model_dir), subjects, out / "persguard")
            raise AssertionError("the interrupted PersGuard run did not stop")
        except KeyboardInterrupt:
            pass
        ckpt = out / ".persguard.checkpoint"
        assert json.loads((ckpt / "state.json").read_text())["step"] == 1
        saved = torch.load(ckpt / "extra_state.pt", weights_only=True)
        assert {name: s["depth"] for name, s in saved.items()} == {"persguard/0": 2, "persguard/1": 2}, saved
    PersGuard(_persguard_config()).run(load_pipeline(model_dir), subjects, out / "persguard")


def _cli_args(model_dir: Path, subject_dir: Path, out: Path, batch: int) -> list[str]:
    return ["-q", "personalize", "--model", str(model_dir), "--images", str(subject_dir), "--class-noun", "person",
            "--method", "lora", "--no-prior", "--steps", str(LORA_STEPS), "--lr", str(LORA_LR), "--batch-size",
            str(batch), "--rank", "4", "--train-text-encoder", "--device", "cpu", "--out", str(out)]


def _python_m_noclone_cli(args: list[str]) -> None:
    """What `accelerate launch -m noclone.cli ARGS` runs in each process: `python -m noclone.cli ARGS`."""
    import runpy

    argv = sys.argv
    sys.argv = ["noclone", *args]
    try:
        runpy.run_module("noclone.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        assert exit_.code == 0, f"noclone exited with {exit_.code}"
    finally:
        sys.argv = argv


def run_scenarios(model_dir: Path, subject_dir: Path, out: Path, batch: int, launched: bool) -> None:
    """DreamBooth (full UNet + text encoder, prior preservation) through `run`; RID generator training; LoRA through
    the command line; APDM on two subjects. `launched` (the workers): the DreamBooth run is killed after 2 of 4 steps (checkpoint at 2)
    and rerun, resuming, and the command line runs as `python -m noclone.cli`."""
    from safetensors.torch import save_file

    from noclone.attacks import DreamBooth
    from noclone.cli import main
    from noclone.cloak.rid import RIDConfig, RIDGenerator, RIDTrainConfig, train_rid
    from noclone.models.pipeline import load_pipeline
    from noclone.training.distributed import current

    dist = current()
    if launched:
        class Killed(DreamBooth):
            def after_step(self, pipe, step):
                if step == 2:  # on every process: the checkpoint of step 2 is the main process's
                    raise KeyboardInterrupt

        try:
            Killed(_db_config(batch)).run(load_pipeline(model_dir), subject_dir, out / "dreambooth")
            raise AssertionError("the interrupted run did not stop")
        except KeyboardInterrupt:
            pass
        state = json.loads((out / ".dreambooth.checkpoint" / "state.json").read_text())
        assert state["step"] == 2 and len(state["history"]) == 2, state
    DreamBooth(_db_config(batch)).run(load_pipeline(model_dir), subject_dir, out / "dreambooth")

    pipe = load_pipeline(model_dir)
    torch.manual_seed(0)
    generator = RIDGenerator(RIDConfig(resolution=32))
    history = train_rid(generator, [pipe], _rid_images(),
                        RIDTrainConfig(steps=RID_STEPS, batch_size=batch, lr=RID_LR, progress=False))
    if dist.is_main:
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(out / "rid.safetensors"))
        (out / "rid_history.json").write_text(json.dumps(history))

    args = _cli_args(model_dir, subject_dir, out / "lora", batch)
    if launched:
        _python_m_noclone_cli(args)
    else:
        assert main(args) == 0

    _run_apdm(model_dir, subject_dir, out)
    _run_persguard(model_dir, subject_dir, out, launched)


def _check_loop_contract(out: Path) -> None:
    """The loop itself, on a toy problem where the arithmetic is exact: SGD (not scale-invariant like AdamW, so a sum
    instead of a mean over processes would show) on loss = mean over this process's shard of x * sum(w), and a
    `stateful` whose state_dict gathers each item from the process owning it (as PersGuard's persistent attackers
    would), called by the loop on every process before the main one writes it."""
    from noclone.training.distributed import current
    from noclone.training.loop import LoopConfig, run_training

    dist = current()

    class Owned:  # item k lives on process k % world_size
        def state_dict(self) -> dict:
            return {k: dist.broadcast_object(100 * dist.rank + k if dist.rank == dist.owner(k) else None,
                                             src=dist.owner(k)) for k in range(3)}

        def load_state_dict(self, state: dict) -> None:
            raise AssertionError("nothing to resume")

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        x = dist.shard(torch.arange(4.0))  # [0, 1] and [2, 3]: shard means 0.5 and 2.5, global mean 1.5
        return {"loss": (x * weight.sum()).mean()}

    history = run_training([("w", weight)], optimizer, step_fn,
                           LoopConfig(2, out / "loop-ckpt", 1, progress=False, max_grad_norm=None), stateful=Owned())
    assert torch.allclose(weight.detach(), torch.full((2,), 1 - 2 * 0.1 * 1.5)), weight  # the global mean's gradient
    assert history[0]["loss"] == pytest.approx(1.5 * 2)  # the mean loss over processes
    if dist.is_main:
        saved = torch.load(out / "loop-ckpt" / "extra_state.pt", weights_only=True)
        assert saved == {0: 0, 1: 101, 2: 2}, saved


def _check_attacker_states(out: Path) -> None:
    """PersGuard's persistent attackers under `--multi-subject sum`: attacker k advances on process k % 2 only, and
    the state dict the loop checkpoints takes each from its owner, equal to the attackers one process advances."""
    from noclone.defenses.base import PersistentAttacker
    from noclone.defenses.persguard import _AttackerStates
    from noclone.training.distributed import current

    dist = current()

    def attackers(owned) -> dict[str, PersistentAttacker]:
        weight = torch.nn.Parameter(torch.zeros(3))
        made = {f"persguard/{k}": PersistentAttacker({"w": weight}, 0.1, horizon=10) for k in range(3)}
        for k, attacker in enumerate(made.values()):
            if k in owned:  # k + 1 steps toward k + 1
                attacker.run(lambda i, k=k: ((weight - (k + 1)) ** 2).sum(), k + 1)
        return made

    gathered = _AttackerStates(attackers(dist.owned(3)), dist).state_dict()
    alone = _AttackerStates(attackers(range(3))).state_dict()
    assert [s["depth"] for s in gathered.values()] == [1, 2, 3], gathered
    for name in alone:
        assert torch.equal(gathered[name]["delta"]["w"], alone[name]["delta"]["w"]), name
        assert gathered[name]["optimizer"]["state"][0]["exp_avg"].equal(alone[name]["optimizer"]["state"][0]["exp_avg"])
    resumed = attackers(())
    _AttackerStates(resumed).load_state_dict(gathered)
    assert [a.depth for a in resumed.values()] == [1, 2, 3]


def _forbid_writes_off_main() -> None:
    """In the processes other than the first, every writer of checkpoints and outputs fails loudly."""
    from noclone.attacks import DreamBooth, LoRA
    from noclone.cloak.rid import RIDGenerator
    from noclone.defenses import apdm, persguard
    from noclone.models import pipeline
    from noclone.training import loop

    def refuse(*args, **kwargs):
        raise AssertionError("a process other than the main one wrote an output or a checkpoint")

    loop.save_checkpoint = refuse
    DreamBooth.save = LoRA.save = RIDGenerator.save_pretrained = refuse
    pipeline.save_pipeline = apdm.check_checkpoint = refuse  # APDM's output and its checkpoint marker
    persguard.check_checkpoint = refuse  # PersGuard's checkpoint marker (its output: save_pipeline)


def _worker(argv: list[str]) -> None:
    from noclone.training.distributed import current

    dist = current()
    assert dist.world_size == PROCESSES, "not launched as two processes"
    if not dist.is_main:
        _forbid_writes_off_main()
    model_dir, subject_dir, out = map(Path, argv[:3])
    _check_loop_contract(out)
    _check_attacker_states(out)
    run_scenarios(model_dir, subject_dir, out, int(argv[3]), launched=True)
    print(f"worker {dist.rank}: done", flush=True)


# ------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def class_cache_warm(tiny_model_dir):
    """Class images generated once, before the launch: the one-process reference and the workers read one cache."""
    from noclone.class_images import class_images
    from noclone.models.pipeline import load_pipeline

    config = _db_config(PER_PROCESS_BATCH)
    class_images(load_pipeline(tiny_model_dir), config.class_prompt, config.num_class_images, seed=config.seed,
                 steps=config.class_image_steps, progress=False)


def test_two_processes_train_as_one_process_at_the_same_global_batch(tiny_model_dir, subject_dir, tmp_path,
                                                                     class_cache_warm):
    """DreamBooth (interrupted and resumed), RID and LoRA (`python -m noclone.cli personalize`) on two processes at batch
    2 train the weights one process trains at batch 4; APDM and PersGuard (interrupted and resumed) on two subjects,
    one per process, train the weights one process trains with both; only the first process writes."""
    from safetensors.torch import load_file

    from noclone.attacks import DreamBooth
    from noclone.attacks.base import load_subject_images
    from noclone.models.pipeline import load_pipeline

    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    started = time.perf_counter()
    proc = _start_launch([__file__, str(tiny_model_dir), str(subject_dir), str(two), str(PER_PROCESS_BATCH)],
                         tmp_path)
    try:  # the reference, meanwhile: one process at the global batch
        run_scenarios(tiny_model_dir, subject_dir, one, PER_PROCESS_BATCH * PROCESSES, launched=False)
        config = _db_config(PER_PROCESS_BATCH)
        control = load_pipeline(tiny_model_dir)  # the negative control: one process at the per-process batch
        DreamBooth(config).train(control, load_subject_images(subject_dir)[1])
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    output = _finish_launch(proc, started)
    assert "worker 0: done" in output and "worker 1: done" in output, output[-3000:]

    # DreamBooth, killed at step 2 and resumed under two processes, equals one uninterrupted process at batch 4
    single = _pipeline_weights(one / "dreambooth")
    assert _same_training(single, _pipeline_weights(two / "dreambooth"), config.lr, config.steps)
    # ...and the check tells the batches apart: one process at the per-process batch is another training
    control_weights = {**{f"unet.{k}": v for k, v in control.unet.state_dict().items()},
                       **{f"text_encoder.{k}": v for k, v in control.text_encoder.state_dict().items()}}
    assert not _same_training(single, {k: control_weights[k] for k in single}, config.lr, config.steps)
    card = json.loads((two / "dreambooth" / "personalization.json").read_text())
    assert card["processes"] == 2 and card["global_batch_size"] == 4 and card["config"]["batch_size"] == 2
    reference_card = json.loads((one / "dreambooth" / "personalization.json").read_text())
    assert "processes" not in reference_card
    assert not (two / ".dreambooth.checkpoint").exists()  # removed once the output is written
    # the recorded losses are the means over the processes: one process's losses at the global batch
    assert card["loss_first_last"] == pytest.approx(reference_card["loss_first_last"], rel=1e-4)

    # RID generator training
    assert _same_training(load_file(str(one / "rid.safetensors")), load_file(str(two / "rid.safetensors")),
                          RID_LR, RID_STEPS)
    rid_one = json.loads((one / "rid_history.json").read_text())
    rid_two = json.loads((two / "rid_history.json").read_text())
    for a, b in zip(rid_one, rid_two, strict=True):
        assert b == pytest.approx(a, rel=1e-4)

    # LoRA through the command line
    name = "pytorch_lora_weights.safetensors"
    assert _same_training(load_file(str(one / "lora" / name)), load_file(str(two / "lora" / name)), LORA_LR,
                          LORA_STEPS)
    card = json.loads((two / "lora" / "personalization.json").read_text())
    assert card["processes"] == 2 and card["global_batch_size"] == 4

    # APDM, --multi-subject sum: one subject per process equals one process with both
    assert _same_training(_pipeline_weights(one / "apdm"), _pipeline_weights(two / "apdm"), APDM_LR, APDM_STEPS)
    norms_one = json.loads((one / "apdm_grad_norms.json").read_text())
    norms_two = json.loads((two / "apdm_grad_norms.json").read_text())
    print(f"APDM applied gradient norms: one process {norms_one}, two {norms_two}")
    assert len(norms_two) == APDM_STEPS and norms_two == pytest.approx(norms_one, rel=1e-4)
    card = json.loads((two / "apdm" / "protection.json").read_text())
    reference_card = json.loads((one / "apdm" / "protection.json").read_text())
    assert card["processes"] == 2 and "processes" not in reference_card
    for key, value in reference_card["metrics"].items():  # the logged means over both subjects
        if key.endswith("_first_last"):
            assert card["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert not (two / ".apdm.checkpoint").exists()

    # PersGuard, --multi-subject sum with persistent attackers, killed after step 1 and resumed: one subject (and
    # its attacker) per process equals one uninterrupted process with both
    assert _same_training(_pipeline_weights(one / "persguard"), _pipeline_weights(two / "persguard"), PERSGUARD_LR,
                          PERSGUARD_STEPS)
    card = json.loads((two / "persguard" / "protection.json").read_text())
    reference_card = json.loads((one / "persguard" / "protection.json").read_text())
    assert card["processes"] == 2 and "processes" not in reference_card and card["implant"] == "unet"
    logged = [key for key in reference_card["metrics"] if key.endswith("_first_last")]
    assert {"bb_first_last", "pp_first_last", "br_first_last", "br_depth_first_last"} <= set(logged), logged
    for key in logged:  # the logged means over both subjects
        assert card["metrics"][key] == pytest.approx(reference_card["metrics"][key], rel=1e-4, abs=1e-6), key
    assert card["metrics"]["br_depth_first_last"] == [2.0, 4.0]  # the resumed attackers went on from depth 2
    for a, b in zip(reference_card["metrics"]["backdoor_loss_after"], card["metrics"]["backdoor_loss_after"],
                    strict=True):  # the final probe, per subject
        assert b == pytest.approx(a, rel=1e-4), (a, b)
    assert not (two / ".persguard.checkpoint").exists()


def test_one_process_is_not_distributed(monkeypatch):
    """Not launched: no process group, no accelerate import, the shard is the whole batch."""
    from noclone.training import distributed

    for name in distributed.WORLD_SIZE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_current", None)
    dist = distributed.current()
    assert dist is distributed.SINGLE and not dist.enabled and dist.is_main
    batch = torch.arange(6)
    assert dist.shard(batch) is batch and dist.global_batch(3) == 3
    two = distributed.Distributed(rank=1, world_size=2)
    assert two.shard(batch).tolist() == [3, 4, 5] and two.global_batch(3) == 6
    with pytest.raises(ValueError, match="does not split"):
        two.shard(torch.arange(5))


def test_defences_refuse_what_several_processes_cannot_run(subject_dir, monkeypatch, caplog):
    """Under a launcher (here a stand-in for process 0 of 2, before any collective): `--multi-subject sum` needs a
    subject per process and the decoder guard is single-process, both refused before any work; `cycle` says that
    the processes repeat one another."""
    import logging

    from noclone.defenses import APDM, APDMConfig, ProtectionSubject, apdm, persguard
    from noclone.defenses.base import log_subject_split
    from noclone.defenses.persguard import PersGuard, PersGuardConfig
    from noclone.errors import NocloneError
    from noclone.training.distributed import Distributed

    two = Distributed(rank=0, world_size=2)
    for module in (apdm, persguard):
        monkeypatch.setattr(module, "current", lambda: two)
    subject = [ProtectionSubject.from_folder(subject_dir, "person")]
    for method in (APDM(APDMConfig(multi_subject="sum")), PersGuard(PersGuardConfig(multi_subject="sum"))):
        with pytest.raises(NocloneError, match="1 subject.*2 processes"):
            method.protect(None, subject)
    for method in (APDM(APDMConfig(implant="decoder")), PersGuard(PersGuardConfig(implant="both"))):
        with pytest.raises(NocloneError, match="decoder guard runs on one process"):
            method.protect(None, subject)
    with caplog.at_level(logging.INFO, logger="noclone.defenses.base"):
        log_subject_split(two, "cycle", 1, "apdm")
    assert "no faster" in caplog.text


if __name__ == "__main__":
    _worker(sys.argv[1:])
