"""The results database: one SQLite file (DIR/results.sqlite), one row per cell x seed, exported to CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from contextlib import closing
from pathlib import Path

from noclone.data.atomic import atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
LABELS = ("model", "subject", "class_noun", "defence", "defence_kind", "transform", "attack", "seed")
METRICS = ("ism", "identity_match_rate", "fdfr", "brisque", "fid", "kid", "dino", "clip_i", "backdoor_rate", "n_images")
STAGE_TIMES = ("protect", "cloak", "transform", "personalize", "generate", "metrics")
TIMES = tuple(f"t_{s}" for s in STAGE_TIMES) + ("t_total",)
COLUMNS = ("cell_id", "position") + LABELS + METRICS + TIMES + ("peak_rss_mb", "peak_gpu_mb", "error", "artifacts")
_TYPES = {"position": "INTEGER", "seed": "INTEGER", "n_images": "INTEGER", "artifacts": "TEXT", "error": "TEXT",
          **{c: "REAL" for c in METRICS + TIMES + ("peak_rss_mb", "peak_gpu_mb") if c != "n_images"}}


class Store:
    """Rows keyed by cell id; every write is a transaction, so a killed run never leaves a broken database."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            cols = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" + (" PRIMARY KEY" if c == "cell_id" else "") for c in COLUMNS)
            db.execute(f"CREATE TABLE IF NOT EXISTS results ({cols})")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def put(self, row: dict) -> None:
        """Insert or replace one row (unknown keys are ignored, missing ones stored as NULL)."""
        values = [json.dumps(row.get(c)) if c == "artifacts" else row.get(c) for c in COLUMNS]
        with closing(self._connect()) as db, db:
            db.execute(f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                       values)

    def keep_only(self, cell_ids: set[str]) -> int:
        """Drop rows of cells no longer in the config; returns how many."""
        with closing(self._connect()) as db, db:
            stale = [r["cell_id"] for r in db.execute("SELECT cell_id FROM results") if r["cell_id"] not in cell_ids]
            db.executemany("DELETE FROM results WHERE cell_id = ?", [(c,) for c in stale])
        return len(stale)

    def rows(self) -> list[dict]:
        """All rows in config order."""
        with closing(self._connect()) as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM results ORDER BY position")]
        for r in rows:
            r["artifacts"] = json.loads(r["artifacts"]) if r.get("artifacts") else {}
        return rows

    def set_meta(self, key: str, value) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default=None):
        with closing(self._connect()) as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default


def export(store: Store, out_dir: Path) -> tuple[Path, Path]:
    """Write results.csv (flat columns) and results.json (rows plus the config) next to the database."""
    rows = store.rows()
    flat = [c for c in COLUMNS if c != "artifacts"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=flat, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in flat})
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_json(json_path, {"name": store.meta("name"), "config": store.meta("config"), "rows": rows})
    return csv_path, json_path
