"""TileLang programs: pure functions (KernelSpec, Plan) -> PrimFuncs. All kernel math lives here.

``build_programs`` is the single entry point used by the cache (to compile) and nothing else needs
to know which stages a plan has. Each call builds fresh PrimFuncs: a compile may mutate one. The
schedule's target picks the dialect the programs are spelled in (``target.py``: a GPU's threads,
or TileLang's serial CPU backend), so one program text serves every target.

Program families ("loop orders" in a schedule):

* ``kv_outer`` / ``q_outer``: the two orders of the selected-block branch (``slc.py``).
* ``dense``: attention over a *contiguous* key range per query (``dense.py``): the compressed
  branch (cmp, keys are compressed tokens) and the sliding window (swa) share one program whose
  mask is the branch's key range.
* ``sel``: top-k block selection (``select.py``), re-reading cmp's tiles the same way.
* ``dec``: decode attention, one new query per sequence over pages of a paged KV cache, split-KV
  (``decode.py``; serves slc, swa and cmp at decode time).
* ``comp``: compression of raw k/v into compressed tokens (``compress.py``; mean and weighted
  pooling are one program with per-(kv head, window position) weights).
* ``gate``: the gated sum of the three branches' outputs and its backward (``gate.py``).
"""

# Knobs each (loop order, phase) reads from its plan. The schedule layer validates plans against
# this table, so a schedule file with a missing knob fails with the knob's name, not deep in here.
REQUIRED_KNOBS = {
    # chunk_rows: read by the glue's block index only (fsagen/slc_index.py query chunks)
    ("kv_outer", "fwd"): ("rows", "tiles_per_item", "threads", "scatter", "chunk_rows", "ctas_per_sm", "gather"),
    ("kv_outer", "bwd"): ("rows", "tiles_per_item", "bwd_threads", "scatter", "chunk_rows", "ctas_per_sm", "gather"),
    ("q_outer", "fwd"): ("q_threads", "num_stages", "bulk_copy", "q_keys", "q_ctas_per_sm", "q_tokens"),
    ("q_outer", "bwd"): ("q_threads", "num_stages", "bulk_copy", "rows", "tiles_per_item", "bwd_threads"),
    ("dense", "fwd"): ("rows", "keys", "threads", "num_stages"),
    ("dense", "bwd"): ("rows", "keys", "bwd_threads", "num_stages", "q_split", "dkdv_rows"),
    ("sel", "fwd"): ("rows", "keys", "threads"),
    # comp: rows = raw rows per tile (a multiple of the stride)
    ("comp", "fwd"): ("rows", "threads"),
    ("comp", "bwd"): ("rows", "bwd_threads"),
    ("dec", "fwd"): ("threads", "num_stages"),
    ("gate", "fwd"): ("rows", "threads"),
    ("gate", "bwd"): ("rows", "bwd_threads"),
}

# The modules each branch's programs come from (besides this file and what they import from the
# package): the artifact cache hashes exactly these (fsagen.cache.kernel_source_files), so editing
# decode.py does not rename the slc artifacts. tests/test_cache.py checks it against the builders.
FAMILY_MODULES = {
    "slc": ("slc", "block_index"),
    "cmp": ("dense", "slc"),
    "swa": ("dense", "slc"),
    "sel": ("select",),
    "comp": ("compress",),
    "dec": ("decode",),
    "gate": ("gate",),
}

_DTYPES = {"bfloat16": "bfloat16", "float16": "float16"}


# The kv-outer block index's steps around its sort (block_index.py): stages of every plan that builds
# the index (a backward may reuse its forward's instead; fsagen/slc.py).
BLOCK_INDEX_STAGES = ("index_keys", "index_entries", "index_bounds", "index_items")


def stage_names(branch: str, loop_order: str, phase: str, plan=None) -> tuple:
    """Stages a plan compiles to, in launch order (``plan``: its knobs, where they add a stage:
    a q_outer forward over several tokens a CTA first writes its work list, ``q_fwd_plan``)."""
    if branch == "sel":
        return ("sel_topk",)
    if branch == "dec":  # the cmp branch's launch also writes its scores (decode-time selection)
        return ("decode_prep", "decode_fwd_scores", "decode_block_keys", "decode_tiles", "decode_fwd",
                "decode_combine")
    if branch == "comp":
        return ("comp_fwd",) if phase == "fwd" else ("comp_bwd_dx", "comp_bwd_dw")
    if branch == "gate":
        return ("gate_fwd",) if phase == "fwd" else ("gate_bwd",)
    if (loop_order, phase) == ("q_outer", "fwd") and plan is not None and plan.knob("q_tokens") > 1:
        return ("q_fwd_plan", "q_fwd")
    return {
        ("kv_outer", "fwd"): (*BLOCK_INDEX_STAGES, "kv_fwd_stats", "kv_fwd_accum"),
        ("kv_outer", "bwd"): (*BLOCK_INDEX_STAGES, "row_dot", "kv_bwd"),
        ("q_outer", "fwd"): ("q_fwd",),
        ("q_outer", "bwd"): (*BLOCK_INDEX_STAGES, "row_dot", "q_bwd_dq", "kv_bwd_dkdv"),
        ("dense", "fwd"): ("dense_fwd",),
        ("dense", "bwd"): ("row_dot", "dense_bwd_dq", "dense_bwd_dkdv"),
    }[(loop_order, phase)]


def _slc_builders(spec, plan, dtype, dl):
    from . import block_index, slc

    G, D, BS = spec.G, spec.D, spec.block_size
    DV = D
    knob = plan.knob
    return {
        "kv_fwd_stats": lambda: slc.kv_fwd_stats(G, D, BS, dtype, knob("rows"), knob("threads"),
                                                 knob("ctas_per_sm"), knob("gather"), dl=dl),
        "kv_fwd_accum": lambda: slc.kv_fwd_accum(G, D, DV, BS, dtype, knob("rows"), knob("threads"),
                                                 knob("scatter"), knob("ctas_per_sm"), knob("gather"), dl=dl),
        "kv_bwd": lambda: slc.kv_bwd(G, D, DV, BS, dtype, knob("rows"), knob("bwd_threads"), True,
                                     knob("scatter"), knob("ctas_per_sm"), knob("gather"), dl=dl),
        "kv_bwd_dkdv": lambda: slc.kv_bwd(G, D, DV, BS, dtype, knob("rows"), knob("bwd_threads"),
                                          False, "x2", dl=dl),
        "row_dot": lambda: slc.row_dot(DV, dtype, 128, dl),
        "q_fwd": lambda: slc.q_fwd(G, D, DV, BS, dtype, knob("q_threads"), knob("num_stages"),
                                   knob("bulk_copy"), knob("q_keys"),
                                   knob("q_ctas_per_sm"), knob("q_tokens"), dl=dl),
        "q_fwd_plan": lambda: slc.q_fwd_plan(BS, knob("q_tokens"), dl),
        "index_keys": lambda: block_index.index_keys(dl),
        "index_entries": lambda: block_index.index_entries(dl),
        "index_bounds": lambda: block_index.index_bounds(dl),
        "index_items": lambda: block_index.index_items(dl),
        "q_bwd_dq": lambda: slc.q_bwd_dq(G, D, DV, BS, dtype, knob("q_threads"), knob("num_stages"),
                                         knob("bulk_copy"), dl=dl),
    }


def _dense_builders(spec, plan, dtype, dl):
    from . import dense, slc

    G, D = spec.G, spec.D
    DV = D
    knob = plan.knob
    return {
        "dense_fwd": lambda: dense.dense_fwd(spec.branch, G, D, DV, dtype, knob("rows"), knob("keys"),
                                             knob("threads"), knob("num_stages"), dl),
        "dense_bwd_dq": lambda: dense.dense_bwd_dq(spec.branch, G, D, DV, dtype, knob("rows"),
                                                   knob("keys"), knob("bwd_threads"), knob("num_stages"), dl),
        "dense_bwd_dkdv": lambda: dense.dense_bwd_dkdv(spec.branch, G, D, DV, dtype, knob("rows"),
                                                       knob("keys"), knob("bwd_threads"), knob("q_split"),
                                                       knob("dkdv_rows"), dl),
        "row_dot": lambda: slc.row_dot(DV, dtype, 128, dl),
    }


def _sel_builders(spec, plan, dtype, dl):
    from . import select

    knob = plan.knob
    return {
        "sel_topk": lambda: select.sel_topk(spec.G, spec.D, dtype, spec.block_size,
                                            spec.kernel_size, spec.stride, spec.topk, knob("rows"),
                                            knob("keys"), knob("threads"), dl),
    }


def _comp_builders(spec, plan, dtype, dl):
    from . import compress

    knob = plan.knob
    shape = (spec.D, dtype, spec.kernel_size, spec.stride, knob("rows"))
    return {
        "comp_fwd": lambda: compress.comp_fwd(*shape, knob("threads"), dl),
        "comp_bwd_dx": lambda: compress.comp_bwd_dx(*shape, knob("bwd_threads"), dl),
        "comp_bwd_dw": lambda: compress.comp_bwd_dw(*shape, knob("bwd_threads"), dl),
    }


def _dec_builders(spec, plan, dtype, dl):
    from . import decode

    args = (spec.G, spec.D, spec.D, dtype, spec.block_size, plan.knob("threads"), plan.knob("num_stages"))
    return {"decode_fwd": lambda: decode.decode_fwd(*args, scores=False, dl=dl),
            "decode_fwd_scores": lambda: decode.decode_fwd(*args, scores=True, dl=dl),
            "decode_prep": lambda: decode.decode_prep(dl),
            "decode_block_keys": lambda: decode.decode_block_keys(spec.G, dl),
            "decode_tiles": lambda: decode.decode_tiles(dl),
            "decode_combine": lambda: decode.decode_combine(spec.D, dl)}


def _gate_builders(spec, plan, dtype, dl):
    from . import gate

    knob = plan.knob
    return {"gate_fwd": lambda: gate.gate_fwd(spec.D, dtype, knob("rows"), knob("threads"), dl),
            "gate_bwd": lambda: gate.gate_bwd(spec.D, dtype, knob("rows"), knob("bwd_threads"), dl)}


def build_programs(spec, plan, target: dict | None = None) -> dict:
    """Fresh programs for every stage of ``plan`` applied to ``spec``, spelled for ``target`` (the
    schedule's ``[target]`` table; None: a GPU): a PrimFunc each, or (PrimFunc, pass configs)
    where the target's dialect needs pass configs (``fsagen.lower`` accepts both)."""
    from .target import dialect_for

    dtype = _DTYPES[spec.dtype]
    dl = dialect_for(target)
    if spec.branch == "slc":
        builders = _slc_builders(spec, plan, dtype, dl)
    elif spec.branch in ("cmp", "swa"):
        builders = _dense_builders(spec, plan, dtype, dl)
    elif spec.branch == "sel":
        builders = _sel_builders(spec, plan, dtype, dl)
    elif spec.branch == "comp":
        builders = _comp_builders(spec, plan, dtype, dl)
    elif spec.branch == "dec":
        builders = _dec_builders(spec, plan, dtype, dl)
    elif spec.branch == "gate":
        builders = _gate_builders(spec, plan, dtype, dl)
    else:
        raise ValueError(f"no programs for branch {spec.branch!r}")
    configs = dl.pass_configs()
    programs = {name: builders[name]() for name in stage_names(spec.branch, plan.loop_order, spec.phase, plan)}
    return {name: (func, configs) if configs else func for name, func in programs.items()}
