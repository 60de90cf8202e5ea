"""Does holding the model in its stored dtype change a real compression? On the CPU ctp holds the
checkpoint's dtype and computes one decoder layer at a time in float32; before, it loaded the whole
model in float32. This compresses a real model both ways in one process and compares every
dequantized decoder weight and every other parameter, exactly.

    python eval/check_stored_dtype.py [--model smollm2-135m] [--prune wanda] [--quant nf4] [--rounding rtn]

(tests/compression/test_stored_dtype.py does the same on a tiny model in the default suite.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ctp.compression.pipeline as pipeline  # noqa: E402
from ctp import CompressConfig  # noqa: E402
from ctp.errors import CTPError  # noqa: E402
from ctp.compression.prune import decoder_linears  # noqa: E402
from ctp.compression.quantize import dense_weight  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prune", default="wanda")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--rounding", default="rtn")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = CompressConfig(device="cpu", prune=args.prune, sparsity=0.5, quant=args.quant,
                            rounding=args.rounding, calib="embedded", nsamples=64, seqlen=256)
    held = pipeline.compress(args.model, config, progress=False).model
    load = pipeline.load_model
    pipeline.load_model = lambda name, dtype=None, **kw: load(name, dtype=torch.float32, **kw)
    whole_fp32 = pipeline.compress(args.model, config, progress=False).model
    a, b = decoder_linears(held), decoder_linears(whole_fp32)
    linears = [n for n in a if not torch.equal(dense_weight(a[n]).float(), dense_weight(b[n]).float())]
    params = [n for (n, x), (_, y) in zip(held.named_parameters(), whole_fp32.named_parameters(), strict=True)
              if x.dtype != y.dtype or not torch.equal(x.float(), y.float())]
    print(f"{args.model} {config.label()}: decoder Linears "
          f"differing {len(linears)} of {len(a)}; other parameters differing {len(params)}")
    sys.exit(1 if linears or params else 0)


if __name__ == "__main__":
    try:
        main()
    except CTPError as exc:  # bad input: one line, no traceback
        sys.exit(f"{Path(__file__).name}: error: {exc}")
