"""examples/llama_nsa.py on a CPU: the NSALlamaAttention adapter inside a tiny transformers Llama model.

The fsagen glue needs a GPU, so the float64-reference stubs of tests/test_nsa_layer.py stand in for
the kernels (``stub_glue``); what is checked is the wiring: weights kept, rotary equal to Llama's,
the padding mask reaching the layer (left-padded rows give the logits of the unpadded sequence),
a training step, generate() without a KV cache, and the errors on what the adapter does not take.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from decode_standin import decode_log, standin_decode  # noqa: E402,F401  (fixtures)
from test_nsa_layer import stub_glue  # noqa: E402,F401  (fixture)

from fsagen.nn import rotary  # noqa: E402
from fsagen.testing import rel_err  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ["--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "64",
        "--vocab", "50", "--batch", "2", "--seq-len", "40", "--pad", "9", "--prompt-len", "30", "--new-tokens", "3",
        "--block-size", "8", "--topk", "5", "--kernel-size", "8", "--stride", "4", "--window", "7"]


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("llama_nsa", REPO / "examples" / "llama_nsa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def args(ex):
    return ex.parse_args(TINY)


def test_swap_keeps_projections_and_sets_the_implementation(ex, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=50, attention_bias=True)
    model = LlamaForCausalLM(cfg)
    old = [{n: p.clone() for n, p in layer.self_attn.named_parameters()} for layer in model.model.layers]
    ex.use_nsa(model, **ex.nsa_fields(args))
    assert model.config._attn_implementation == ex.ATTN_IMPLEMENTATION
    for i, (layer, params) in enumerate(zip(model.model.layers, old)):
        attn = layer.self_attn
        assert isinstance(attn, ex.NSALlamaAttention) and attn.layer_idx == i
        assert set(params) == {f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")}
        for name, p in params.items():  # q_proj.weight, q_proj.bias, ...
            assert torch.equal(attn.nsa.get_parameter(name), p), name
        assert attn.nsa.spec.head_dim == 8 and attn.nsa.spec.num_kv_heads == 2 and attn.nsa.spec.window_size == 7
        assert attn.nsa.rope_theta == cfg.rope_parameters["rope_theta"]


def test_rotary_matches_llama(ex):
    """The layer's rotary (by position) is Llama's apply_rotary_pos_emb with the config's theta."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, rope_theta=500.0)
    theta = ex._rope_theta(cfg)
    assert theta == 500.0
    pos = torch.arange(37)
    x = torch.randn(1, 4, 37, 16)  # [B, H, T, D] as Llama holds q
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos[None])
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = rotary(x[0].transpose(0, 1), pos, theta).transpose(0, 1)[None]  # the layer's [M, H, D] layout
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_left_padding_gives_the_unpadded_logits(ex, args, stub_glue):
    model = ex.build_model(args, "cpu").eval()
    ids, mask = ex.left_padded_batch(args, 40, torch.Generator().manual_seed(1), "cpu")
    assert mask[1].tolist() == [0] * 9 + [1] * 31 and mask[0].all()
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, 9:]).logits  # row 1's real tokens, no padding, no mask
        full = model(input_ids=ids[:1]).logits
    assert rel_err(batch[1, 9:], alone[0]) < 1e-5
    assert rel_err(batch[0], full[0]) < 1e-5
    assert batch[1, :9].isfinite().all()


def test_train_step_and_generate(ex, args, stub_glue, standin_decode):
    res = ex.run(args, "cpu")
    assert res["nsa_layers"] == 2
    assert res["loss_before"] > res["loss_after"] > 0  # one AdamW step at lr 1e-3 on its own batch
    assert res["agree"] and len(res["new_tokens"]) == 2 and all(len(t) == 3 for t in res["new_tokens"])
    assert res["cache_agree"] and res["cached"] == res["by_hand"] and res["prompt_lengths"] == [30, 21]
    assert res["generate_cache_agree"]
    assert len(standin_decode) == 2 * 2 * 2  # (new tokens - 1) decode steps x 2 layers, by hand and by generate()
    text = ex.report(args, res, "cpu (reference stubs)")
    assert res["gap"] > 0 and "identical: yes" in text and "2 attention layers replaced" in text
    assert "identical to the recomputing loop: yes" in text


# the real kernels on CPU tensors (the cpu schedule): D = 32, G = 2, the block and window sizes and
# the decode page size (16) of tests/test_cpu_kernels.py; prompts of 62, 53 and 44 real tokens grow
# across the window ends at 48 and 64 and the block end at 64
KERNEL_ARGS = ["--hidden", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
               "--vocab", "64", "--batch", "3", "--seq-len", "40", "--pad", "9", "--prompt-len", "62",
               "--new-tokens", "6", "--block-size", "32", "--topk", "4", "--kernel-size", "32", "--stride", "16",
               "--window", "40"]


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_with_the_cache_equals_recomputing_the_prefix(ex, decode_log, seed):
    """Prefill through the CPU kernels into the caches, then batched decode steps through the
    decode kernels, by hand and through ``model.generate``: the same tokens as rerunning the whole
    prefix through the kernels each step."""
    args = ex.parse_args(KERNEL_ARGS + ["--seed", str(seed)])
    model = ex.build_model(args, "cpu").eval()
    ids, mask = ex.left_padded_batch(args, args.prompt_len, torch.Generator().manual_seed(seed), "cpu")
    recomputed, _ = ex.greedy_by_hand(model, ids, mask, args.new_tokens, "cpu")
    cached, _ = ex.greedy_with_cache(model, ids, mask, args.new_tokens, "cpu", page_size=16)
    assert cached.shape == (3, 62 + 6)
    assert torch.equal(cached, recomputed), (cached[:, 62:].tolist(), recomputed[:, 62:].tolist())
    assert len(decode_log) == 2 * 5 and all(seqs == [0, 1, 2] for seqs in decode_log)
    generated = ex.generate_with_cache(model, ids, mask, args.new_tokens, "cpu", page_size=16)  # transformers' loop
    assert torch.equal(generated, recomputed), (generated[:, 62:].tolist(), recomputed[:, 62:].tolist())
    assert len(decode_log) == 2 * 10


def test_model_cache_bookkeeping_and_errors(ex, decode_log):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    args = ex.parse_args(KERNEL_ARGS)
    model = ex.build_model(args, "cpu").eval()
    cache = ex.NSAModelCache(model, 3, 70, page_size=16)
    assert sorted(cache.caches) == [0, 1] and cache.caches[0].page_size == 16 and cache.caches[1].max_len == 70
    ids, mask = ex.left_padded_batch(args, 20, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert cache.seen == 20 and cache.get_mask_sizes(1) == (21, 0)
        assert cache.caches[1].lengths == mask.sum(1).tolist() == [20, 11, 2]
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1), past_key_values=cache,
              use_cache=True)
    assert cache.seen == 21 and cache.caches[0].lengths == [21, 12, 3] and len(decode_log) == 2
    with torch.no_grad():  # two tokens onto each prefix (speculative drafts): one decode step of two rows each
        model(input_ids=ids[:, :2], attention_mask=torch.ones(3, 23, dtype=torch.long), past_key_values=cache,
              use_cache=True)
    assert cache.caches[0].lengths == [23, 14, 5] and cache.seen == 23 and len(decode_log) == 4
    attn = model.model.layers[0].self_attn
    with pytest.raises(NotImplementedError, match=r"^past_key_values: .*NSAModelCache only"):
        attn(torch.randn(3, 1, 128), past_key_values=DynamicCache())
    plain = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=1, intermediate_size=64, vocab_size=50))
    with pytest.raises(ValueError, match=r"^model: has no NSALlamaAttention layer"):
        ex.NSAModelCache(plain, 1, 8)


def test_bad_inputs(ex, args, stub_glue):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = ex.build_model(args, "cpu")
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 40, 32)
    with pytest.raises(ValueError, match=r"^attention_mask: NSALlamaAttention takes the 2-D"):
        attn(x, attention_mask=torch.ones(2, 1, 40, 40))
    with pytest.raises(NotImplementedError, match=r"^past_key_values: .*use_cache=False"):
        attn(x, past_key_values=object())
    restart = torch.cat([torch.arange(20), torch.arange(20)])[None].expand(2, -1)
    with pytest.raises(ValueError, match=r"^position_ids: restart inside a row"):
        attn(x, position_ids=restart)
    with pytest.raises(ValueError, match=r"^attention_mask: "):  # the layer's own check: [B, T] like x
        attn(x, attention_mask=torch.ones(2, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^attention_mask: must be the \[B, T\]"):
        ex._padding_mask(2, 40, 40, attention_mask=torch.ones(2, 41, dtype=torch.bool))
    # Llama 3 style rope scaling is not what the layer implements
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"^config.rope_parameters: .*rope_type 'default'"):
        ex.NSALlamaAttention(cfg, 0)
    # heads that do not divide: NSASpec's rule, raised by the adapter's constructor
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=4, num_hidden_layers=1)
    with pytest.raises(Exception, match="num_q_heads must be a multiple of num_kv_heads"):
        ex.NSALlamaAttention(cfg, 0)
    # a layer left unswapped under the fsagen implementation says so
    ex.register()
    plain = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=1, intermediate_size=64, vocab_size=50))
    plain.set_attn_implementation(ex.ATTN_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="LlamaAttention was not replaced by NSALlamaAttention"):
        plain(input_ids=torch.randint(3, 50, (1, 12)))


def test_main_needs_cuda(ex):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert ex.main(TINY) == 1
