"""The device's achievable matmul throughput, measured in the same run as the model it divides.

MFU is model FLOP/s over peak FLOP/s. A spec-sheet peak means nothing on a CPU (it depends on
the cores, their clocks and the other tenants), so the peak is a large square matmul timed as
one more interleaved case, under the same load and thread count as the training steps.
"""

from __future__ import annotations

import torch

from flip_ds.bench.cases import timed
from flip_ds.precision import dtype_of

# Big enough to reach the BLAS's steady state, small enough to time in well under a second
SIZE = {"cpu": 2048, "cuda": 8192}
PRODUCTS_PER_BLOCK = {"cpu": 4, "cuda": 50}


class MatmulPeak:
    """`size`^3 matrix products in `dtype` on every rank at once."""

    def __init__(self, precision: str, device: str) -> None:
        self.name = f"matmul {precision}"
        self.precision = precision
        self.device = device
        self.size = SIZE.get(device, SIZE["cuda"])
        dtype = dtype_of(precision)
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(self.size, self.size, generator=generator).to(device, dtype)
        self.b = torch.randn(self.size, self.size, generator=generator).to(device, dtype)
        self.out = torch.empty_like(self.a)

    def run_block(self, steps: int) -> float:
        products = PRODUCTS_PER_BLOCK.get(self.device, PRODUCTS_PER_BLOCK["cuda"])

        def work() -> None:
            for _ in range(products):
                torch.mm(self.a, self.b, out=self.out)

        return timed(self.device, work, products)

    def tflops(self, seconds_per_product: float) -> float:
        return 2 * self.size**3 / seconds_per_product / 1e12
