"""Re-record the activation tapes that tests/probes/test_shipped_packs.py replays.

Run it after retraining a shipped pack or changing its recipe, on CPU (the test compares the tape
with what the model gives on CPU in float32). About 20 minutes on 2 cores; writes
tests/probes/fixtures/shipped_packs/<pack_id>.{json,safetensors}.

    .venv/bin/python scripts/make-pack-fixtures.py [PACK_ID ...] [--answers DIR]

harmful_completion's rows are the model's own answers: pass the folder `latentwatch train --recipe
harmful_completion --answers DIR` kept them in, or an empty one to generate them (~20 minutes more).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `tests` package sits at the repo root

from monitor.runner import ModelRunner  # noqa: E402
from tests.probes.test_shipped_packs import FIXTURES, PACKS, record_tape  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packs", nargs="*", default=list(PACKS), help=f"shipped pack ids (default: {' '.join(PACKS)})")
    ap.add_argument("--answers", type=Path, default=Path("answers"),
                    help="harmful_completion's answers (train --answers DIR); generated there when empty")
    args = ap.parse_args()
    runner = ModelRunner.load(device="cpu")
    for pack_id in args.packs:
        record_tape(runner, pack_id, answers=args.answers)
        print(f"wrote {FIXTURES / pack_id}.json and .safetensors")


if __name__ == "__main__":
    main()
