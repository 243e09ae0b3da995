"""A child process for the kill -9 test: it updates a model store forever, until killed.

``python -m tests.agent.store_churn DATA_DIR MODEL_NAME TARGET FILE:VERSION...`` cycles
through the given bundle files: it "downloads" each into the store's tmp/ in small chunks, stages
it, activates it, and now and then rolls back or collects garbage -- every step the
agent takes, so a SIGKILL lands in any of them. It prints ``ready`` once the first
activation is in place (the parent only kills after that: before it, "none" is right).
"""

from __future__ import annotations

import sys
from itertools import count
from pathlib import Path

from agent.store import BundleRef, ModelStore
from shared.integrity import sha256_hex


def main(data_dir: str, model_name: str, target: str, *bundle_files: str) -> None:
    store = ModelStore(Path(data_dir))
    bundles = []
    for spec in bundle_files:
        name, version = spec.rsplit(":", 1)
        data = Path(name).read_bytes()
        bundles.append((data, BundleRef(sha256_hex(data), len(data), int(version), target)))
    for step in count():
        data, ref = bundles[step % len(bundles)]
        temp = store.temp_path()
        with temp.open("wb") as f:
            for start in range(0, len(data), 16 * 1024):
                f.write(data[start : start + 16 * 1024])
        store.stage(temp, sha256=ref.sha256, length=ref.length)
        store.activate(model_name, ref)
        if step == 0:
            print("ready", flush=True)
        if step % 3 == 2:
            store.rollback(model_name)
        if step % 4 == 3:
            store.garbage_collect()


if __name__ == "__main__":
    main(*sys.argv[1:])
