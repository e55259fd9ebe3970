"""TPU facts that the compiler (`danlu compile`, pretrain/aot.py) and the launcher (`danlu launch tpu`)
share: the generations, accelerator types <-> topologies, chips and hosts of a slice.

    parse_topology("v5e:4x4")                -> (CHIPS["v5e"], (4, 4))
    topology_for_accelerator("v5p-32")       -> "v5p:2x2x4"   (v5p and v4 types count TensorCores)
    accelerator_for_topology("v6e:16x16")    -> "v6e-256"
    chips("v5litepod-16"), hosts("v5litepod-16") -> 16, 4

A topology is ``GEN:AxB`` (v5e, v6e: 2-D torus) or ``GEN:AxBxC`` (v4, v5p: 3-D); every function that
takes a topology also takes an accelerator type. Pure Python: no jax, no libtpu.
"""

from __future__ import annotations

import dataclasses
import math

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: per-chip HBM and the published peaks the roofline divides by."""
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s (pretrain/flops.py PEAK_BF16_FLOPS)
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, all links together
    dcn_bandwidth: float  # bytes/s per chip across slices (host NIC / chips per host)
    accelerator_prefix: str  # gcloud --accelerator-type prefix, e.g. v5litepod-16
    cores_per_chip_in_type: int  # v4-8 / v5p-8 count TensorCores (2 per chip); v5e / v6e count chips
    three_d: bool  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    single_host_chips: int  # the largest slice on one TPU VM host (v5litepod-8, v6e-8: 8; v4-8, v5p-8: 4)
    chips_per_host: int = 4  # hosts of a multi-host slice have 4 chips each


# Public figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version pages).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 300e9, 6.25e9, "v4", 2, True, 4),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 200e9, 6.25e9, "v5litepod", 1, False, 8),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 600e9, 6.25e9, "v5p", 2, True, 4),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 448e9, 6.25e9, "v6e", 1, False, 8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}


class TopologyError(ValueError):
    """A topology or accelerator name that cannot be used."""


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5e:4x4' -> (Chip v5e, (4, 4)); also accepts an accelerator type ('v5litepod-16', 'v5p-32')."""
    if ":" not in name and "-" in name:
        return parse_topology(topology_for_accelerator(name))
    gen, _, dims = name.partition(":")
    gen = ALIASES.get(gen.lower(), gen.lower())
    if gen not in CHIPS:
        raise TopologyError(f"topology {name!r}: unknown TPU generation {gen!r}; known: {', '.join(CHIPS)}")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise TopologyError(f"topology {name!r}: expected GEN:AxB or GEN:AxBxC, e.g. v5e:4x4 or v5p:2x2x4") from None
    chip = CHIPS[gen]
    if len(shape) != (3 if chip.three_d else 2) or min(shape) < 1:
        raise TopologyError(f"topology {name!r}: {gen} slices are {'3' if chip.three_d else '2'}-D, "
                            f"e.g. {'v5p:2x2x4' if chip.three_d else 'v5e:4x4'}")
    return chip, shape


def _default_shape(n: int, three_d: bool) -> tuple[int, ...]:
    """The most cubic (or square) shape of ``n`` chips with non-decreasing sides (2x2x4, 4x4, 8x16)."""
    best = None
    for a in range(1, n + 1):
        if n % a:
            continue
        if three_d:
            for b in range(a, n // a + 1):
                if (n // a) % b or n // (a * b) < b:
                    continue
                cand = (a, b, n // (a * b))
                if best is None or max(cand) - min(cand) < max(best) - min(best):
                    best = cand
        elif n // a >= a:
            cand = (a, n // a)
            if best is None or cand[1] - cand[0] < best[1] - best[0]:
                best = cand
    return best


def topology_for_accelerator(accelerator_type: str) -> str:
    """'v5litepod-16' -> 'v5e:4x4', 'v5p-32' -> 'v5p:2x2x4', 'v6e-256' -> 'v6e:16x16'."""
    prefix, _, n = accelerator_type.rpartition("-")
    gen = ALIASES.get(prefix.lower(), prefix.lower())
    if gen not in CHIPS or not n.isdigit():
        raise TopologyError(f"accelerator type {accelerator_type!r}: expected e.g. v5litepod-16, v5p-32, v6e-256, v4-32")
    chip = CHIPS[gen]
    if int(n) % chip.cores_per_chip_in_type:
        raise TopologyError(f"accelerator type {accelerator_type!r}: the count is of TensorCores, a multiple of "
                            f"{chip.cores_per_chip_in_type}")
    count = int(n) // chip.cores_per_chip_in_type
    return f"{gen}:{'x'.join(map(str, _default_shape(count, chip.three_d)))}"


def accelerator_for_topology(topology: str) -> str:
    """'v5e:4x4' -> 'v5litepod-16', 'v5p:2x2x4' -> 'v5p-32' (the gcloud --accelerator-type)."""
    chip, shape = parse_topology(topology)
    return f"{chip.accelerator_prefix}-{math.prod(shape) * chip.cores_per_chip_in_type}"


def chips(topology: str) -> int:
    """Chips of one slice: 'v5e:4x4' or 'v5litepod-16' -> 16, 'v5p-32' -> 16."""
    return math.prod(parse_topology(topology)[1])


def hosts(topology: str) -> int:
    """TPU VM hosts of one slice, i.e. processes of `danlu train`: one up to ``single_host_chips``
    chips (v5litepod-8: 1), else ``chips_per_host`` chips each (v5litepod-16: 4, v5p-32: 4)."""
    chip, _ = parse_topology(topology)
    n = chips(topology)
    return 1 if n <= chip.single_host_chips else math.ceil(n / chip.chips_per_host)
