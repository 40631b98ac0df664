"""Sine-module ΔW error: exact (row blocks) against the sampled estimate, cost and accuracy.

On LLaMA-shaped rank-16 sine modules (bench_codec.py's synthetic adapter, one layer), factors
quantized with ECSQ at 0.7σ steps: the exact relative error (every entry of sin(ω·B̂Â) -
sin(ω·BA)) and the sampled estimator of deltacodec.dwerror over 20 seeds (mean, standard
deviation and worst deviation relative to the exact value), with CPU seconds for each.

    python benchmarks/bench_v2_dwerror.py
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_codec import synthetic_adapter  # noqa: E402
from deltacodec import ecsq  # noqa: E402
from deltacodec.dwerror import SAMPLES, relative_error  # noqa: E402


def main() -> None:
    ad = synthetic_adapter(16, layers=1)
    print(f"{'module':10s} {'out x in':>12} {'exact':>8} {'cpu s':>6} | sampled 2^{SAMPLES.bit_length() - 1}: "
          f"{'mean':>8} {'sd %':>6} {'worst %':>7} {'cpu ms':>7}")
    for m in ad.modules:
        qa = ecsq.quantize(m.A, float(m.A.std()) * 0.7, 0).values().reshape(m.A.shape)
        qb = ecsq.quantize(m.B, float(m.B.std()) * 0.7, 0).values().reshape(m.B.shape)
        t0 = time.process_time()
        exact = relative_error(m.A, m.B, qa, qb, sine=True, omega=m.omega, exact_limit=1 << 40)
        t_exact = time.process_time() - t0
        t0 = time.process_time()
        est = np.array([relative_error(m.A, m.B, qa, qb, sine=True, omega=m.omega, exact_limit=0, seed=s)
                        for s in range(20)])
        t_s = (time.process_time() - t0) / 20
        print(f"{m.name.rsplit('.', 1)[-1]:10s} {m.B.shape[0]:>5}x{m.A.shape[1]:<6} {exact:>8.5f} {t_exact:>6.2f} | "
              f"{'':13s}{est.mean():>8.5f} {100 * est.std() / exact:>6.2f} {100 * np.abs(est - exact).max() / exact:>7.2f} "
              f"{1e3 * t_s:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
