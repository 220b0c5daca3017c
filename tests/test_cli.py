"""The CLI contract: commands work end to end on a tiny model, every bad input is exit 2 + one stderr line."""

import json

import pytest

from noclone.cli import main


def _fails(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("noclone: error:"), err
    assert needle in err[0], err[0]


def test_personalize_then_generate(tiny_model_dir, subject_dir, tmp_path, capsys):
    out = tmp_path / "db"
    assert main(["-q", "personalize", "--model", str(tiny_model_dir), "--images", str(subject_dir), "--class-noun", "person",
                 "--method", "dreambooth", "--steps", "2", "--num-class-images", "2", "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file()
    gen = tmp_path / "gen"
    assert main(["-q", "generate", "--model", str(out), "--prompt", "a photo of sks person", "--n", "2", "--steps", "2",
                 "--scheduler", "ddim", "--out", str(gen)]) == 0
    manifest = json.loads((gen / "manifest.json").read_text())
    assert [e["seed"] for e in manifest["images"]] == [0, 1]
    assert manifest["model_fingerprint"] and manifest["steps"] == 2 and manifest["guidance"] == 7.5
    assert len(list(gen.glob("*.png"))) == 2


def test_lora_cli_and_generate_with_lora(tiny_model_dir, subject_dir, tmp_path):
    out = tmp_path / "lora"
    assert main(["-q", "personalize", "--model", str(tiny_model_dir), "--images", str(subject_dir), "--class-noun", "person",
                 "--method", "lora", "--steps", "2", "--no-prior", "--out", str(out)]) == 0
    assert main(["-q", "generate", "--model", str(tiny_model_dir), "--lora", str(out), "--prompt", "a photo of sks person",
                 "--n", "1", "--steps", "2", "--out", str(tmp_path / "gen")]) == 0


def test_generation_is_reproducible(tiny_model_dir, tmp_path):
    for name in ("a", "b"):
        assert main(["-q", "generate", "--model", str(tiny_model_dir), "--prompt", "a photo of a dog", "--n", "2",
                     "--steps", "2", "--seed", "5", "--out", str(tmp_path / name)]) == 0
    for f in (tmp_path / "a").glob("*.png"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_bad_inputs_exit_2_with_one_line(tiny_model_dir, subject_dir, tmp_path, capsys):
    base = ["personalize", "--class-noun", "person", "--method", "dreambooth", "--steps", "1"]
    _fails(capsys, base + ["--model", str(tmp_path / "nope"), "--images", str(subject_dir), "--out", str(tmp_path / "o")], "no such model")
    _fails(capsys, base + ["--model", str(tiny_model_dir), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope")
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((subject_dir / "photo_0.png").read_bytes())
    _fails(capsys, base + ["--model", str(tiny_model_dir), "--images", str(one), "--out", str(tmp_path / "o")], "need at least 2")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("a.png", "b.png"):
        (corrupt / name).write_bytes((subject_dir / "photo_0.png").read_bytes())
    (corrupt / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _fails(capsys, base + ["--model", str(tiny_model_dir), "--images", str(corrupt), "--out", str(tmp_path / "o")], "c.jpg")
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    _fails(capsys, base + ["--model", str(ckpt), "--images", str(subject_dir), "--out", str(tmp_path / "o")], "--allow-pickle")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    _fails(capsys, base + ["--model", str(tiny_model_dir), "--images", str(subject_dir), "--out", str(taken)], "--overwrite")
    assert (taken / "keep.txt").read_text() == "mine"
    _fails(capsys, ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--scheduler", "warp", "--out", str(tmp_path / "g")], "unknown scheduler")
    _fails(capsys, ["generate", "--model", str(tiny_model_dir), "--lora", str(tmp_path / "nolora"), "--prompt", "x", "--out", str(tmp_path / "g")], "LoRA")
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_sandbox_render_cli(tmp_path, capsys):
    out = tmp_path / "renders"
    assert main(["-q", "sandbox", "render", "--class-noun", "dog", "--identity", "123", "--n", "3", "--first-photo", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dog_123_0002.png", "dog_123_0003.png", "dog_123_0004.png"]
    _fails(capsys, ["sandbox", "render", "--class-noun", "dog", "--identity", "-1", "--out", str(tmp_path / "x")], "")
