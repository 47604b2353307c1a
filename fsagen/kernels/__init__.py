"""TileLang programs: pure functions (KernelSpec, Plan) -> PrimFuncs. All kernel math lives here.

``build_programs`` is the single entry point used by the cache (to compile) and nothing else needs
to know which stages a plan has. Each call builds fresh PrimFuncs: a compile may mutate one.
"""

# Knobs each (loop order, phase) reads from its plan. The schedule layer validates plans against
# this table, so a schedule file with a missing knob fails with the knob's name, not deep in here.
REQUIRED_KNOBS = {
    ("kv_outer", "fwd"): ("rows", "tiles_per_item", "threads", "scatter"),
    ("kv_outer", "bwd"): ("rows", "tiles_per_item", "bwd_threads", "scatter"),
    ("q_outer", "fwd"): ("q_threads", "num_stages", "bulk_copy"),
    ("q_outer", "bwd"): ("q_threads", "num_stages", "bulk_copy", "rows", "tiles_per_item", "bwd_threads"),
}

_DTYPES = {"bfloat16": "bfloat16", "float16": "float16"}


def stage_names(loop_order: str, phase: str) -> tuple:
    """Stages a plan compiles to, in launch order."""
    return {
        ("kv_outer", "fwd"): ("kv_fwd_stats", "kv_fwd_accum"),
        ("kv_outer", "bwd"): ("row_dot", "kv_bwd"),
        ("q_outer", "fwd"): ("q_fwd",),
        ("q_outer", "bwd"): ("row_dot", "q_bwd_dq", "kv_bwd_dkdv"),
    }[(loop_order, phase)]


def build_programs(spec, plan) -> dict:
    """Fresh PrimFuncs for every stage of ``plan`` applied to ``spec`` (an slc KernelSpec)."""
    from . import slc

    if spec.branch != "slc":
        raise ValueError(f"no programs for branch {spec.branch!r}")
    G, D, BS = spec.G, spec.D, spec.block_size
    DV = getattr(spec, "DV", None) or D
    dtype = _DTYPES[spec.dtype]
    knob = plan.knob
    builders = {
        "kv_fwd_stats": lambda: slc.kv_fwd_stats(G, D, BS, dtype, knob("rows"), knob("threads")),
        "kv_fwd_accum": lambda: slc.kv_fwd_accum(G, D, DV, BS, dtype, knob("rows"), knob("threads"),
                                                 knob("scatter")),
        "kv_bwd": lambda: slc.kv_bwd(G, D, DV, BS, dtype, knob("rows"), knob("bwd_threads"), True,
                                     knob("scatter")),
        "kv_bwd_dkdv": lambda: slc.kv_bwd(G, D, DV, BS, dtype, knob("rows"), knob("bwd_threads"),
                                          False, "x2"),
        "row_dot": lambda: slc.row_dot(DV, dtype, 128),
        "q_fwd": lambda: slc.q_fwd(G, D, DV, BS, dtype, knob("q_threads"), knob("num_stages"),
                                   knob("bulk_copy")),
        "q_bwd_dq": lambda: slc.q_bwd_dq(G, D, DV, BS, dtype, knob("q_threads"), knob("num_stages"),
                                         knob("bulk_copy")),
    }
    return {name: builders[name]() for name in stage_names(plan.loop_order, spec.phase)}
