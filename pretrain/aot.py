"""`danlu compile`: compile the train step for a TPU topology ahead of time, without a TPU.

    danlu compile configs/tpu/125m-v5e-16.yaml --topology v5e:4x4
    danlu compile configs/train/7b.yaml --topology v6e:16x16 --num-slices 2
    danlu compile configs/train/1b.yaml --topology v5e:4x4 --search --max-candidates 8

libtpu (the `tpu` extra) describes the chips of a topology (`jax.experimental.topologies`), and
the exact ``train_step`` of ``danlu train`` (``pretrain.train.build(..., abstract=True)``: the
same mesh, shardings, donation, microbatching and remat) is lowered and compiled for them. XLA's
memory analysis then says, per chip, what the arguments (parameters, optimizer state), outputs,
temporaries (activations, gradients, collectives' buffers) and generated code take, against the
HBM of that generation. When the temporaries do not fit, the TPU compiler refuses with
RESOURCE_EXHAUSTED; the report then carries the amount it asked for.

Step time is a roofline estimate, a lower bound that assumes perfect overlap:
``max(compute, HBM traffic, ICI traffic, DCN traffic)``, each from analytic counts (FLOPs of
pretrain/flops.py plus the forward recomputed by ``model.remat=full``; weights streamed per pass,
optimizer update; FSDP all-gathers and reduce-scatters, tensor-parallel all-reduces, data-parallel
gradient all-reduce) against the chip's published peak FLOP/s and bandwidths. XLA's own FLOP count
is reported too, but it counts the body of a loop once (the scanned layers, the microbatch loop),
so it is not used for the estimate.

Exit status: 0 fits, 4 does not fit (the message names the knob to turn), 2 invalid config.
``--search`` enumerates mesh shapes (data, fsdp, tensor), remat policies and microbatch counts,
orders them by the analytic estimates, compiles up to ``--max-candidates`` and ranks those that
fit by estimated step time, each with the overrides that select it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from typing import Sequence

# The TPU generations and topology names are shared with the launcher (danlu launch tpu).
from danlu.base.tpu import (CHIPS, Chip, GiB, TopologyError, accelerator_for_topology,  # noqa: F401  (re-exported)
                            parse_topology, topology_for_accelerator)

EXIT_DOES_NOT_FIT = 4


# ---------------------------------------------------------------------------------------------
# Topologies (compile-only devices)


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The compile-only TPU devices of ``num_slices`` slices of ``topology`` (no TPU needed)."""
    chip, shape = parse_topology(topology)
    if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):  # not on a TPU VM
        # libtpu would ask the GCE metadata server and the environment what TPU this is, and warn
        # at length when it cannot tell; the topology name says it all.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_for_topology(topology))
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_WORKER_ID", "0")
    # Several processes may compile at once (pytest -n 2, a search beside a compile): each only
    # describes chips, none owns a TPU, so libtpu's one-process-per-host lock does not apply.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    name = f"{chip.name}:{'x'.join(map(str, shape))}"
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except RuntimeError as e:
        raise TopologyError(f"libtpu cannot describe topology {name!r} ({e}); install the `tpu` extra "
                            f"(pip install 'danlu[tpu]')") from None
    devices = list(desc.devices)
    expected = math.prod(shape) * num_slices
    if len(devices) != expected:  # v4 exposes both TensorCores of a chip; danlu counts megacore chips
        raise TopologyError(f"topology {name!r}: libtpu gives {len(devices)} devices for {expected} chips; "
                            f"this generation is not supported by danlu compile")
    return devices


# ---------------------------------------------------------------------------------------------
# Analytic estimates


def _dtype_bytes(name: str) -> int:
    return 2 if name == "bfloat16" else 4


def _abstract_bytes_per_chip(tree) -> int:
    """Bytes of one chip's shard of every ShapeDtypeStruct leaf (shardings attached)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def estimate(cfg, chips: int, chip: Chip, num_slices: int = 1) -> dict[str, float]:
    """Analytic per-chip memory and roofline step time of one config on ``chips`` chips.

    Returns {model_flops (per step, all chips), hardware_flops (+ remat recompute), compute_s, hbm_s,
    ici_s, dcn_s, step_s, bound, mfu, tokens_per_sec, state_bytes, activation_bytes, memory_bytes}.
    ``memory_bytes`` is a rough activation model used only to order ``--search`` candidates.
    """
    from pretrain.config import resolve_mesh_shape
    from pretrain.flops import count_params, flops_per_token

    m, t = cfg.model, cfg.train
    shape = resolve_mesh_shape(cfg.mesh, chips)
    dp, fsdp, tp = shape["data"], shape["fsdp"], shape["tensor"]
    T, B, micro = cfg.data.seq_len, t.global_batch_size, t.microbatches
    tokens = B * T
    fpt = flops_per_token(m, T)
    n_total = count_params(m)["total"]
    n_matmul = fpt["matmul_params"]
    n_layer_matmul = n_matmul - m.d_model * m.vocab_size
    model_flops = fpt["total"] * tokens
    recompute = (2 * n_layer_matmul + fpt["attention"] / 3) * tokens if m.remat == "full" else 0.0
    hardware_flops = model_flops + recompute
    cb, pb = _dtype_bytes(m.compute_dtype), _dtype_bytes(m.param_dtype)

    # HBM: every pass streams the (gathered) weights of this chip's tensor shard, per microbatch;
    # AdamW reads params, grads, m, v and writes params, m, v (fp32) of this chip's shard.
    # Activations: each layer writes and reads back its matmul outputs and a few [tokens, d] tensors
    # per pass, plus the [heads, T, T] attention probabilities of model.attention=xla.
    passes = 3 + (m.remat == "full")
    weight_bytes = passes * micro * n_matmul * cb / tp
    shard = n_total / (fsdp * tp)
    optimizer_bytes = 7 * 4 * shard + 2 * micro * 4 * shard  # + gradient accumulation read/write
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    n_mlp = 2 if m.mlp == "swiglu" else 1
    dots = (q + 2 * kv + m.d_model + n_mlp * m.d_ff + m.d_model) / tp
    scores = (m.n_heads / tp) * T if m.attention == "xla" else 0
    tok_chip = tokens / (dp * fsdp)
    activation_traffic = passes * tok_chip * m.n_layers * (2 * dots + 8 * m.d_model + 2 * scores) * cb
    hbm_bytes = weight_bytes + optimizer_bytes + activation_traffic

    # ICI: FSDP all-gathers the weights each pass and reduce-scatters the gradients per microbatch;
    # tensor parallelism all-reduces [tokens, d] twice per layer per pass; data all-reduces gradients.
    ici = 0.0
    if fsdp > 1:
        ici += micro * (passes - 1) * n_total * pb / tp * (fsdp - 1) / fsdp  # all-gathers (fwd, bwd, remat)
        ici += micro * n_total * 4 / tp * (fsdp - 1) / fsdp  # gradient reduce-scatter
    if tp > 1:
        ici += 2 * m.n_layers * passes * tok_chip * m.d_model * cb * 2 * (tp - 1) / tp
    dp_ici = dp // num_slices
    if dp_ici > 1:
        ici += 2 * shard * 4 * (dp_ici - 1) / dp_ici
    dcn = 2 * shard * 4 * (num_slices - 1) / num_slices if num_slices > 1 else 0.0

    terms = {"compute": hardware_flops / chips / chip.peak_flops, "hbm": hbm_bytes / chip.hbm_bandwidth,
             "ici": ici / chip.ici_bandwidth, "dcn": dcn / chip.dcn_bandwidth}
    bound = max(terms, key=terms.get)
    step_s = terms[bound]  # perfect overlap of compute and traffic: a lower bound
    serial_s = sum(terms.values())  # no overlap at all: an upper bound of this model

    # Memory (rough, for ordering candidates): the state, plus the activations one microbatch keeps
    # for the backward pass under the remat policy, plus the logits.
    state_bytes = n_total * (pb + 4 + 4 + 4) / (fsdp * tp)  # params, grads (fp32), Adam m and v
    tok_chip_micro = tokens / micro / (dp * fsdp)
    per_layer = {"full": m.d_model, "save_dots": dots + m.d_model,
                 "none": 2 * dots + scores + 4 * m.d_model}[m.remat] * cb
    # One layer's working set while it is (re)computed in the backward pass: its matmul outputs and,
    # for model.attention=xla, the fp32 [heads, T, T] scores and probabilities.
    transient = tok_chip_micro * ((2 * dots + 4 * m.d_model) * cb + 2 * scores * 4)
    act = tok_chip_micro * per_layer * m.n_layers + transient
    logits = 0 if (t.vocab_chunk or t.loss_chunks) else tok_chip_micro * m.vocab_size / tp * 4 * 2
    return {"model_flops": model_flops, "hardware_flops": hardware_flops,
            **{f"{k}_s": v for k, v in terms.items()}, "step_s": step_s, "serial_s": serial_s, "bound": bound,
            "mfu": model_flops / (chips * chip.peak_flops * step_s),
            "mfu_serial": model_flops / (chips * chip.peak_flops * serial_s), "tokens_per_sec": tokens / step_s,
            "state_bytes": state_bytes, "activation_bytes": act + logits,
            "memory_bytes": state_bytes + act + logits}


# ---------------------------------------------------------------------------------------------
# Compiling


@dataclasses.dataclass
class CompileReport:
    """What `danlu compile` prints (or writes as JSON). Bytes are per chip."""
    topology: str
    num_slices: int
    chips: int
    generation: str
    device_kind: str
    mesh: dict
    overrides: list
    fits: bool
    hbm_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    total_bytes: int
    compile_seconds: float
    xla_flops_per_chip: float | None  # XLA's count: the body of a loop counted once
    model_flops_per_step: float
    hardware_flops_per_step: float
    tokens_per_step: int
    roofline: dict
    error: str = ""
    advice: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_OOM_TEMPS = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGTP]?)\)")
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGTP]?) of ([\d.]+)([KMGTP]?) hbm")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def _parse_oom(message: str) -> int | None:
    """Bytes of temporaries (or of everything) the TPU compiler asked for, from its RESOURCE_EXHAUSTED text."""
    if m := _OOM_TEMPS.search(message):
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    if m := _OOM_USED.search(message):
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    return None


def _mesh_overrides(shape: dict, num_slices: int) -> list[str]:
    return [f"mesh.data={shape['data'] // num_slices}", f"mesh.fsdp={shape['fsdp']}", f"mesh.tensor={shape['tensor']}"]


def advise(cfg, report_or_none, estimate_: dict, hbm: int) -> list[str]:
    """Which knobs to turn when it does not fit, most effective first, each as an override."""
    m, t = cfg.model, cfg.train
    out = []
    state, temps = estimate_["state_bytes"], (report_or_none.temp_bytes if report_or_none else estimate_["activation_bytes"])
    if state > 0.5 * hbm:
        out.append(f"mesh.fsdp: parameters and optimizer state take {state / GiB:.1f} GiB per chip; shard them "
                   f"over more chips (mesh.data=1 mesh.fsdp=-1) or use more chips")
    if m.remat != "full":
        out.append(f"model.remat=full (now {m.remat}): keep only each layer's input for the backward pass")
    micro = t.microbatches * 2
    if t.global_batch_size % micro == 0:
        out.append(f"train.microbatches={micro} (now {t.microbatches}): activations of half as many sequences at once")
    if m.compute_dtype == "float32":
        out.append("model.compute_dtype=bfloat16: halves activations")
    if not (t.vocab_chunk or t.loss_chunks):
        out.append("train.loss_chunks=8 (or train.vocab_chunk): never materialise the [batch, seq, vocab] logits")
    out.append(f"or let `danlu compile ... --search` try the combinations (temporaries now {temps / GiB:.1f} GiB)")
    return out


def compile_config(cfg, topology: str, num_slices: int = 1, overrides: Sequence[str] = (),
                   devices: list | None = None) -> CompileReport:
    """Compiles ``cfg``'s train step for ``num_slices`` slices of ``topology``; never raises for OOM."""
    import jax
    import jax.numpy as jnp
    from pretrain.config import ConfigError, validate
    from pretrain.train import BATCH_KEYS, build

    chip, shape_ = parse_topology(topology)
    devices = devices if devices is not None else topology_devices(topology, num_slices)
    chips = len(devices)
    if num_slices > 1 and cfg.mesh.dcn_data == 1:
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn_data=num_slices))
        overrides = [*overrides, f"mesh.dcn_data={num_slices}"]
    if cfg.mesh.dcn_data != num_slices:
        raise ConfigError(f"mesh.dcn_data={cfg.mesh.dcn_data} slices, but --num-slices {num_slices}; make them agree")
    mesh_shape = validate(cfg, chips)
    est = estimate(cfg, chips, chip, num_slices)
    hbm = chip.hbm_bytes
    t0 = time.perf_counter()
    try:
        built = build(cfg, devices, abstract=True)
    except NotImplementedError as e:  # jax.experimental.mesh_utils: no torus-aligned assignment
        raise ConfigError(mesh_error(mesh_shape, topology, num_slices, e)) from None
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=built.batch_sharding) for k in BATCH_KEYS}
    argument_bytes = _abstract_bytes_per_chip((built.state, batch))
    common = dict(topology=f"{chip.name}:{'x'.join(map(str, shape_))}", num_slices=num_slices, chips=chips,
                  generation=chip.name, device_kind=devices[0].device_kind, mesh=dict(mesh_shape),
                  overrides=list(overrides), hbm_bytes=hbm, model_flops_per_step=est["model_flops"],
                  hardware_flops_per_step=est["hardware_flops"], tokens_per_step=B * T,
                  roofline={k: est[k] for k in ("compute_s", "hbm_s", "ici_s", "dcn_s", "step_s", "serial_s", "bound",
                                                "mfu", "mfu_serial", "tokens_per_sec")})
    try:
        compiled = built.train_step.lower(built.state, batch).compile()
    except Exception as e:  # the TPU compiler refuses a program whose temporaries exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        temps = _parse_oom(str(e)) or 0
        report = CompileReport(**common, fits=False, argument_bytes=argument_bytes, output_bytes=0, alias_bytes=0,
                               temp_bytes=temps, generated_code_bytes=0, total_bytes=argument_bytes + temps,
                               compile_seconds=time.perf_counter() - t0, xla_flops_per_chip=None,
                               error=str(e).strip().splitlines()[0][:500])
        report.advice = advise(cfg, report, est, hbm)
        return report
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    report = CompileReport(**common, fits=total <= hbm, argument_bytes=mem.argument_size_in_bytes,
                           output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                           temp_bytes=mem.temp_size_in_bytes, generated_code_bytes=mem.generated_code_size_in_bytes,
                           total_bytes=total, compile_seconds=seconds,
                           xla_flops_per_chip=float(cost.get("flops", 0.0)) if cost else None)
    if not report.fits:
        report.advice = advise(cfg, report, est, hbm)
    return report


def mesh_error(mesh_shape: dict, topology: str, num_slices: int, error: Exception) -> str:
    chip, shape = parse_topology(topology)
    return (f"mesh data={mesh_shape['data'] // num_slices} fsdp={mesh_shape['fsdp']} tensor={mesh_shape['tensor']} "
            f"cannot be laid out on the {topology} torus: each mesh axis must be a product of whole physical "
            f"axes ({' x '.join(map(str, shape))}); e.g. mesh.fsdp=-1 with the others 1 always can "
            f"(jax: {str(error).splitlines()[0][:200]})")


def mesh_fits_torus(cfg, devices: list) -> bool:
    """Whether ``danlu train``'s mesh of ``cfg`` maps onto these devices' physical torus."""
    from pretrain.sharding import make_mesh

    try:
        make_mesh(cfg, devices)
    except NotImplementedError:
        return False
    return True


def format_report(r: CompileReport) -> str:
    """The human-readable report: memory per chip, fit, FLOPs, roofline step time and MFU."""
    g = lambda b: f"{b / GiB:8.2f} GiB"
    rf = r.roofline
    lines = [
        f"topology {r.topology}" + (f" x {r.num_slices} slices" if r.num_slices > 1 else "")
        + f": {r.chips} chips ({r.device_kind}), mesh data={r.mesh['data']} fsdp={r.mesh['fsdp']} "
          f"tensor={r.mesh['tensor']}" + (f" (data over {r.num_slices} slices by DCN)" if r.num_slices > 1 else "")
        + f"; compiled in {r.compile_seconds:.1f} s",
        "memory per chip:",
        f"  arguments        {g(r.argument_bytes)}   (parameters, optimizer state, batch)",
        f"  outputs          {g(r.output_bytes)}   ({g(r.alias_bytes).strip()} of them alias the donated state)",
        f"  temporaries      {g(r.temp_bytes)}   (activations, gradients, collective buffers)",
        f"  generated code   {g(r.generated_code_bytes)}",
        f"  total            {g(r.total_bytes)}   of {r.hbm_bytes / GiB:.0f} GiB HBM ({r.generation}): "
        + ("fits" if r.fits else "DOES NOT FIT"),
    ]
    if r.error:
        lines.append(f"  compiler: {r.error}")
    lines += [
        f"FLOPs per step: model {r.model_flops_per_step:.3e} (6N + attention), with remat recompute "
        f"{r.hardware_flops_per_step:.3e}; XLA counts "
        + (f"{r.xla_flops_per_chip:.3e} per chip (loop bodies once)" if r.xla_flops_per_chip else "n/a"),
        f"roofline step time {rf['step_s'] * 1e3:.1f} ms ({rf['bound']}-bound; compute {rf['compute_s'] * 1e3:.1f} ms, "
        f"HBM {rf['hbm_s'] * 1e3:.1f} ms, ICI {rf['ici_s'] * 1e3:.1f} ms, DCN {rf['dcn_s'] * 1e3:.1f} ms; "
        f"{rf['serial_s'] * 1e3:.1f} ms if nothing overlapped)",
        f"  -> {rf['tokens_per_sec']:,.0f} tokens/s, MFU {rf['mfu_serial']:.0%}-{rf['mfu']:.0%}",
    ]
    if r.advice:
        lines.append("to make it fit, turn one of these knobs:")
        lines += [f"  - {a}" for a in r.advice]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg, chips: int, num_slices: int = 1, max_tensor: int = 8,
               remats: Sequence[str] = ("none", "save_dots", "full"),
               max_microbatches: int = 64) -> list[list[str]]:
    """Every valid (mesh, remat, microbatches) override list for ``chips`` chips."""
    from pretrain.config import ConfigError, validate

    per_slice = chips // num_slices
    out = []
    for tp in _divisors(per_slice):
        if tp > max_tensor:
            continue
        for fsdp in _divisors(per_slice // tp):
            dp = per_slice // (tp * fsdp)
            micro = 1
            while micro <= max_microbatches and cfg.train.global_batch_size % micro == 0:
                for remat in remats:
                    ov = [f"mesh.data={dp}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tp}", f"model.remat={remat}",
                          f"train.microbatches={micro}"]
                    try:
                        validate(_with(cfg, ov, num_slices), chips)
                    except ConfigError:
                        continue
                    out.append(ov)
                micro *= 2
    return out


def _with(cfg, overrides: Sequence[str], num_slices: int = 1):
    """``cfg`` with dotted overrides applied (through the config loader, so they are validated alike)."""
    from danlu.base.config import apply_override  # the loader's own override parser
    from pretrain.config import config_from_dict

    tree = cfg.to_dict()
    for item in overrides:
        apply_override(tree, item)
    if num_slices > 1:
        tree["mesh"]["dcn_data"] = num_slices
    return config_from_dict(tree)


def search(cfg, topology: str, num_slices: int = 1, max_candidates: int = 8, base_overrides: Sequence[str] = (),
           log=print, **candidate_kwargs) -> list[tuple[list[str], CompileReport]]:
    """Compiles up to ``max_candidates`` configurations, cheapest estimated step time first among
    those whose estimated memory fits; returns [(overrides, report)] of all compiled, fitting first,
    ranked by roofline step time."""
    chip, _ = parse_topology(topology)
    devices = topology_devices(topology, num_slices)
    chips = len(devices)
    scored = []
    torus_ok: dict[tuple, bool] = {}
    for ov in candidates(cfg, chips, num_slices, **candidate_kwargs):
        c = _with(cfg, ov, num_slices)
        mesh_key = tuple(ov[:3])
        if mesh_key not in torus_ok:
            torus_ok[mesh_key] = mesh_fits_torus(c, devices)
        if not torus_ok[mesh_key]:
            continue
        est = estimate(c, chips, chip, num_slices)
        # Likely fits first, then fastest (candidates() lists fewer microbatches and less
        # recomputation first, and the sort is stable, so they win ties).
        scored.append((est["memory_bytes"] > chip.hbm_bytes, est["step_s"], ov))
    scored.sort(key=lambda s: (s[0], s[1]))
    log(f"{len(scored)} candidate configurations for {chips} chips (meshes that map onto the torus); "
        f"compiling up to {max_candidates}")
    results = []
    for i, (_, step_s, ov) in enumerate(scored[:max_candidates]):
        c = _with(cfg, ov, num_slices)
        report = compile_config(c, topology, num_slices, [*base_overrides, *ov], devices=devices)
        log(f"  [{i + 1}/{min(max_candidates, len(scored))}] {' '.join(ov)}: "
            f"{report.total_bytes / GiB:.1f} GiB per chip, {'fits' if report.fits else 'does not fit'}, "
            f"~{report.roofline['step_s'] * 1e3:.0f} ms/step ({report.compile_seconds:.0f} s to compile)")
        results.append((ov, report))
    results.sort(key=lambda r: (not r[1].fits, r[1].roofline["step_s"]))
    return results


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p) -> None:
    p.add_argument("config", help="training config (YAML), e.g. configs/tpu/125m-v5e-16.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `danlu train`")
    p.add_argument("--topology", required=True,
                   help="TPU slice, e.g. v5e:4x4, v5p:2x2x4, v6e:16x16, or an accelerator type (v5litepod-16, v5p-32)")
    p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (mesh.dcn_data); default 1")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--search", action="store_true",
                   help="try mesh shapes, remat policies and microbatch counts; rank those that fit")
    p.add_argument("--max-candidates", type=int, default=8, help="--search: compile at most this many (default 8)")


def main(args) -> int:
    from pretrain.config import load_config

    if args.num_slices < 1:
        print("danlu compile: --num-slices must be >= 1", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    try:
        parse_topology(args.topology)
    except TopologyError as e:
        print(f"danlu compile: {e}", file=sys.stderr)
        return 2
    if args.search:
        log = (lambda s: print(s, file=sys.stderr)) if args.json else print
        results = search(cfg, args.topology, args.num_slices, args.max_candidates, args.overrides, log=log)
        fitting = [(ov, r) for ov, r in results if r.fits]
        if args.json:
            print(json.dumps({"fitting": [r.to_dict() for _, r in fitting],
                              "not_fitting": [r.to_dict() for _, r in results if not r.fits]}))
        else:
            print(f"\n{len(fitting)} of {len(results)} compiled configurations fit, fastest first:" if fitting
                  else f"\nnone of the {len(results)} compiled configurations fits; raise --max-candidates or use more chips")
            for rank, (ov, r) in enumerate(fitting, 1):
                print(f"{rank:2d}. ~{r.roofline['step_s'] * 1e3:.0f} ms/step, MFU <= {r.roofline['mfu']:.0%}, "
                      f"{r.total_bytes / GiB:.1f} GiB/chip: danlu train {args.config} "
                      + " ".join([*args.overrides, *ov]))
        return 0 if fitting else EXIT_DOES_NOT_FIT
    report = compile_config(cfg, args.topology, args.num_slices, args.overrides)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0 if report.fits else EXIT_DOES_NOT_FIT
