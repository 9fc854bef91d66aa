#!/usr/bin/env python
"""Re-create the bundled sample (CoreDiffLib/data): a 25 % dose abdomen and its normal-dose scan.

    python scripts/make_sample.py

8 slices of 512², phantom seed 4242 (never used for training or the held-out benchmark),
simulated like the training data (fan-beam, nested Poisson + electronic noise, FBP), int16 HU.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CoreDiffLib.io import Volume, write_volume  # noqa: E402
from CoreDiffLib.simulation import simulate_pair  # noqa: E402

SEED, SLICES, SIZE, DOSE = 4242, 8, 512, 0.25


def main() -> int:
    out = REPO / "CoreDiffLib" / "data"
    ndct, ldct, spacing = simulate_pair("abdomen", SLICES, SIZE, DOSE, seed=SEED)
    write_volume(Volume(ndct, spacing, pixel_type="int16"), out / "sample_abdomen_ndct.nrrd")
    write_volume(Volume(ldct, spacing, pixel_type="int16"), out / "sample_abdomen_ldct25.nrrd")
    print(f"wrote {out}/sample_abdomen_ndct.nrrd and sample_abdomen_ldct25.nrrd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
