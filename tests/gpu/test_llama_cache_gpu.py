"""examples/llama_nsa.py on the GPU: greedy generation with the KV cache (varlen prefill of
left-padded prompts into the caches, then batched decode steps through the decode kernels)
gives the tokens of the loop that recomputes the whole prefix through the prefill kernels each
step, unless a step's two best logits are within the example's NEAR_TIE."""
import pytest
import torch

from test_llama_nsa import ex  # noqa: F401  (fixture; skips the module without transformers)

pytestmark = pytest.mark.gpu


def test_llama_greedy_with_the_cache_equals_recomputing(ex):
    args = ex.parse_args(["--hidden", "512", "--layers", "4", "--heads", "8", "--kv-heads", "2", "--batch", "3",
                          "--pad", "300", "--prompt-len", "1100", "--new-tokens", "12"])
    model = ex.build_model(args, "cuda").eval()
    ids, mask = ex.left_padded_batch(args, args.prompt_len, torch.Generator().manual_seed(3), "cuda")
    recomputed, gap = ex.greedy_by_hand(model, ids, mask, args.new_tokens, "cuda")
    cached, cache_gap = ex.greedy_with_cache(model, ids, mask, args.new_tokens, "cuda")
    gap = min(gap, cache_gap)
    case = f"llama greedy with cache, prompts {mask.sum(1).tolist()}, {args.new_tokens} new tokens"
    print(f"\n[{case}] recomputed {recomputed[:, args.prompt_len:].tolist()} cached "
          f"{cached[:, args.prompt_len:].tolist()} smallest gap {gap:.3g}")
    assert torch.equal(cached, recomputed) or gap < ex.NEAR_TIE, f"{case}: differ with no near-tie (gap {gap})"
