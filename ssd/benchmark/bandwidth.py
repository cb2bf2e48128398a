"""Nominal HBM bandwidth by GPU name: the memory roofline's denominator."""
from __future__ import annotations

# bytes/s; the first key contained in the device name wins (GH200 before H200, PCIe/NVL before H100)
NOMINAL_BANDWIDTH = (("GH200", 4.0e12), ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12),
                     ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12))


def nominal_bandwidth(device_name: str) -> float | None:
    return next((bw for key, bw in NOMINAL_BANDWIDTH if key in device_name), None)
