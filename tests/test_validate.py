"""check_slc_inputs: each bad input raises the right error type naming the argument."""

import pytest
import torch

from fsagen.validate import check_slc_inputs

N, HQ, HKV, D, BS, TOPK = 40, 4, 2, 64, 16, 3


def good():
    """Valid inputs: sequences of 25 and 15 tokens (2 and 1 blocks of 16), -1 padding."""
    q = torch.zeros(N, HQ, D, dtype=torch.bfloat16)
    k = torch.zeros(N, HKV, D, dtype=torch.bfloat16)
    v = torch.zeros(N, HKV, D, dtype=torch.bfloat16)
    idx = torch.full((HKV, N, TOPK), -1, dtype=torch.int32)
    idx[:, :, 0] = 0
    idx[:, 16:25, 1] = 1
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    return dict(q=q, k=k, v=v, topk_idx=idx, cu_seqlens=cu, block_size=BS, scale=None)


def _set(name, value):
    def edit(a):
        a[name] = value(a) if callable(value) else value
    return edit


def _poke(name, index, value):
    def edit(a):
        a[name] = a[name].clone()
        a[name][index] = value
    return edit


BAD = {
    # case: (edit, error type, argument named in the message)
    "q_fp32": (_set("q", lambda a: a["q"].float()), TypeError, "q"),
    "q_not_tensor": (_set("q", lambda a: a["q"].tolist()), TypeError, "q"),
    "k_dtype_differs": (_set("k", lambda a: a["k"].half()), TypeError, "k"),
    "v_dtype_differs": (_set("v", lambda a: a["v"].half()), TypeError, "v"),
    "topk_int64": (_set("topk_idx", lambda a: a["topk_idx"].long()), TypeError, "topk_idx"),
    "cu_int64": (_set("cu_seqlens", lambda a: a["cu_seqlens"].long()), TypeError, "cu_seqlens"),
    "k_on_meta": (_set("k", lambda a: a["k"].to("meta")), ValueError, "k"),
    "cu_on_meta": (_set("cu_seqlens", lambda a: a["cu_seqlens"].to("meta")), ValueError, "cu_seqlens"),
    "q_2d": (_set("q", lambda a: a["q"][:, 0]), ValueError, "q"),
    "v_4d": (_set("v", lambda a: a["v"][None]), ValueError, "v"),
    "topk_2d": (_set("topk_idx", lambda a: a["topk_idx"][0]), ValueError, "topk_idx"),
    "cu_2d": (_set("cu_seqlens", lambda a: a["cu_seqlens"][None]), ValueError, "cu_seqlens"),
    "k_tokens": (_set("k", lambda a: a["k"][:-1]), ValueError, "k"),
    "hq_not_multiple": (_set("k", lambda a: torch.zeros(N, 3, D, dtype=torch.bfloat16)), ValueError, "k"),
    "k_head_dim": (_set("k", lambda a: a["k"][..., :32]), ValueError, "k"),
    "v_heads": (_set("v", lambda a: a["v"][:, :1]), ValueError, "v"),
    "v_head_dim": (_set("v", lambda a: a["v"][..., :32]), ValueError, "v"),
    "topk_heads": (_set("topk_idx", lambda a: a["topk_idx"][:1]), ValueError, "topk_idx"),
    "topk_tokens": (_set("topk_idx", lambda a: a["topk_idx"][:, :-1]), ValueError, "topk_idx"),
    "topk_zero": (_set("topk_idx", lambda a: a["topk_idx"][..., :0]), ValueError, "topk_idx"),
    "cu_one_entry": (_set("cu_seqlens", lambda a: a["cu_seqlens"][:1]), ValueError, "cu_seqlens"),
    "block_size_float": (_set("block_size", 16.0), TypeError, "block_size"),
    "block_size_zero": (_set("block_size", 0), ValueError, "block_size"),
    "scale_str": (_set("scale", "0.1"), TypeError, "scale"),
    "scale_nan": (_set("scale", float("nan")), ValueError, "scale"),
    "cu_not_from_zero": (_poke("cu_seqlens", 0, 1), ValueError, "cu_seqlens"),
    "cu_decreasing": (_set("cu_seqlens", torch.tensor([0, 25, 20, 40], dtype=torch.int32)), ValueError, "cu_seqlens"),
    "cu_short_of_n": (_poke("cu_seqlens", -1, 39), ValueError, "cu_seqlens"),
    "cu_past_n": (_poke("cu_seqlens", -1, 41), ValueError, "cu_seqlens"),
    "index_below_minus_one": (_poke("topk_idx", (1, 3, 2), -2), ValueError, "topk_idx"),
    "index_past_sequence": (_poke("topk_idx", (0, 30, 1), 1), ValueError, "topk_idx"),  # seq 2 has 1 block
    "index_far_out": (_poke("topk_idx", (1, 0, 2), 1000), ValueError, "topk_idx"),
    "duplicate_index": (_poke("topk_idx", (0, 20, 2), 1), ValueError, "topk_idx"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_argument(case):
    edit, kind, arg = BAD[case]
    a = good()
    edit(a)
    with pytest.raises(kind, match=rf"^{arg}: "):
        check_slc_inputs(**a)


def test_good_inputs_pass():
    check_slc_inputs(**good())


def test_future_block_and_repeated_padding_are_allowed():
    a = good()
    a["topk_idx"][:, :16, 1] = 1  # block 1 is after these queries' own block: ignored, not an error
    check_slc_inputs(**a)


@pytest.mark.parametrize("row,ok", [
    ([1, 0, -1], True),     # valid, not ascending: the sort path finds no duplicate
    ([-1, 1, 0], True),     # padding first, not ascending
    ([-1, 0, 0], False),    # duplicate behind padding
    ([1, -1, 1], False),    # duplicate around padding
    ([0, 1, -1], True),     # ascending then padding: the fast path
])
def test_duplicate_check_with_and_without_the_ordered_fast_path(row, ok):
    a = good()
    _poke("topk_idx", (1, 20), torch.tensor(row, dtype=torch.int32))(a)  # token 20: sequence 1, 2 blocks
    if ok:
        check_slc_inputs(**a)
    else:
        with pytest.raises(ValueError, match="distinct"):
            check_slc_inputs(**a)


def test_value_checks_can_be_skipped():
    a = good()
    _poke("topk_idx", (0, 30, 1), 1)(a)
    _poke("cu_seqlens", 0, 3)(a)
    check_slc_inputs(**a, check_index_values=False)


@pytest.mark.parametrize("field,value", [("block_size", 32), ("head_dim", 96), ("topk", 100)])
def test_schedule_rejects_unsupported_spec(field, value):
    pytest.importorskip("fsagen.schedule")
    from fsagen.errors import UnsupportedSpec

    a = good()
    if field == "block_size":
        a["block_size"] = value
    elif field == "head_dim":
        for name in ("q", "k", "v"):
            a[name] = a[name][..., :1].expand(*a[name].shape[:2], value).contiguous()
    else:
        a["topk_idx"] = torch.full((HKV, N, value), -1, dtype=torch.int32)
    with pytest.raises(UnsupportedSpec):
        check_slc_inputs(**a, arch="sm90", phases=("fwd", "bwd"))
    check_slc_inputs(**a, check_index_values=False)  # CPU, no arch given: schedule not asked


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_non_tensor_input_reaches_the_type_check(arg):
    """selected_attention must name the argument, not fail reading .requires_grad of a list."""
    import fsagen

    args = dict(q=torch.zeros(4, 2, 8, dtype=torch.bfloat16), k=torch.zeros(4, 1, 8, dtype=torch.bfloat16),
                v=torch.zeros(4, 1, 8, dtype=torch.bfloat16))
    args[arg] = [[0.0]]
    idx = torch.zeros(1, 4, 1, dtype=torch.int32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match=rf"^{arg}: must be a torch.Tensor"):
        fsagen.selected_attention(args["q"], args["k"], args["v"], idx, 4, cu)
