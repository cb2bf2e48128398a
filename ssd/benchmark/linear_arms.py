"""The benches' --linear arms: which linear-layer implementations an engine is built with."""
from __future__ import annotations

import argparse

from ssd.layers.cublaslt import LISTED_ALGORITHMS

LINEAR_ARMS = ("measured", "measured-without-lt", "measured-without-tma", "measured-without-fusion", "cublas")
LINEAR_ARMS_HELP = ("measured per shape among F.linear, the Triton kernels (few-row and TMA) and cuBLASLt's "
                    "algorithms; the same without cuBLASLt's or without the TMA kernel; the same with each layer's "
                    "norms / residual adds / SiLU as kernels of their own (ssd.layers.norm_fusion off); or "
                    "F.linear throughout")


def add_linear_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--linear ARM [ARM ...]; what: how the bench runs the arms."""
    parser.add_argument("--linear", nargs="+", choices=LINEAR_ARMS, default=["measured"],
                        help=f"linear-layer choices to {what}: {LINEAR_ARMS_HELP}")


def linear_options(arm: str) -> dict:
    """The engine / runner keyword arguments of one --linear arm."""
    return dict(measured_linear=arm.startswith("measured"),
                linear_algorithms=0 if arm == "measured-without-lt" else LISTED_ALGORITHMS,
                linear_tma=arm != "measured-without-tma", norm_fusion=arm != "measured-without-fusion")
