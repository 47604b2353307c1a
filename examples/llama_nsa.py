"""NativeSparseAttention inside a Hugging Face ``transformers`` Llama model: one training step and
greedy generation, the attention running through fsagen's kernels.

A small randomly initialised ``LlamaForCausalLM`` is built, every decoder layer's ``self_attn``
(``LlamaAttention``) is replaced by :class:`NSALlamaAttention` (:func:`use_nsa`), and then

1. one training step on random tokens, one row left-padded (``loss.backward()``, AdamW step; the
   loss of the same batch is printed before and after the step);
2. greedy generation of ``--new-tokens`` tokens with ``model.generate(do_sample=False,
   use_cache=False)``: no KV cache, every step runs the whole prefix again through fsagen (the
   prefill), checked against a hand-written greedy loop doing the same;
3. greedy generation with the KV cache (:class:`NSAModelCache`, one :class:`fsagen.NSAKVCache` per
   layer): the left-padded prompts of different lengths are prefilled through fsagen into the
   cache (varlen prefill), then every step runs one token per sequence through the cache
   (batched decode, :func:`fsagen.decode.nsa_decode`), by hand (:func:`greedy_with_cache`) and
   through ``model.generate(past_key_values=NSAModelCache(...))`` (:func:`generate_with_cache`);
   checked token for token against the recomputing loop of 2.

How the swap works (transformers 5.x, tested with 5.17.0, 5.18.0 and 5.25.0):

* ``LlamaAttention.forward(hidden_states, position_embeddings, attention_mask, past_key_values,
  **kwargs) -> (output, weights)`` is what a decoder layer calls.  :class:`NSALlamaAttention` keeps
  that signature and wraps a :class:`fsagen.NativeSparseAttention` whose q/k/v/o projections take
  the Llama layer's weights (the gate projection and the compression parameters are new).
* The rotary embedding is NSA's own: q and raw keys at their position within their sequence, the
  compressed keys at their window start (NSA's rule, which ``position_embeddings`` -- cos/sin per
  token -- cannot express).  Its base is the config's ``rope_theta``; only the default rope type
  is accepted (Llama 3 style frequency scaling is not implemented by the layer).
* Padding: the model builds its mask through the attention implementation registered under
  :data:`ATTN_IMPLEMENTATION`, whose mask function hands the 2-D ``[B, T]`` padding mask through
  unchanged (instead of a 4-D additive mask); the layer packs the real tokens of each row (left or
  right padding) into a varlen batch.  The registered attention function itself is never called by
  a swapped layer: it raises if a layer was left unswapped.
* KV cache: pass an :class:`NSAModelCache` as ``past_key_values`` (with the growing ``[B, T]``
  padding mask, as generation keeps it).  It answers the few questions the model asks a cache (seen
  length, mask sizes) and hands each layer its own ``NSAKVCache``; the layer rotates the new token
  at its row's own cached length, so left padding costs no position.
* Not supported (clear errors): transformers' own caches (``DynamicCache``; generate with
  ``use_cache=False``, or use :func:`greedy_with_cache`), 4-D masks, several sequences packed in one
  row (``position_ids`` that restart).

Needs a CUDA GPU with the sm90 kernels (D = hidden / heads = 64 and G = 4 at the defaults: in the
default grid and in ``bench/grids/layer_gpu.toml``) and ``transformers`` (``pip install
'fsagen[examples]'``)::

    python examples/llama_nsa.py --out runs/llama_nsa.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fsagen import NativeSparseAttention
from fsagen.validate import fail

ATTN_IMPLEMENTATION = "fsagen_nsa"
NEAR_TIE = 0.05  # logit gap under which generate() and the greedy loop may legitimately pick differently


# --------------------------------------------------------------------------- the adapter


def _rope_theta(config) -> float:
    """The config's rotary base; ValueError for rope types other than the default."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        fail(ValueError, "config.rope_parameters", "NativeSparseAttention implements the default rotary embedding "
                                                   "only (rope_type 'default')", repr(rope_type))
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        fail(ValueError, "config.rope_parameters", "needs a rope_theta", params)
    return float(theta)


class NSALlamaAttention(nn.Module):
    """A drop-in for ``LlamaAttention``: NativeSparseAttention with the Llama layer's projections.

    Args:
        config: the model's ``LlamaConfig`` (hidden_size, num_attention_heads,
            num_key_value_heads, head_dim, attention_bias, rope parameters).
        layer_idx: the decoder layer's index (kept for transformers' bookkeeping).
        nsa_fields: NSASpec fields (block_size, topk, kernel_size, stride, window_size,
            init_blocks, local_blocks, compression, gate, dtype).

    ``self.nsa`` is the :class:`fsagen.NativeSparseAttention` doing the work.
    """

    def __init__(self, config, layer_idx: int, *, device=None, param_dtype=None, **nsa_fields):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.nsa = NativeSparseAttention(
            hidden_size=config.hidden_size, num_q_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, head_dim=head_dim, bias=bool(config.attention_bias),
            rope_theta=_rope_theta(config), device=device, param_dtype=param_dtype, **nsa_fields)

    @classmethod
    def from_llama_attention(cls, attn: nn.Module, **nsa_fields) -> "NSALlamaAttention":
        """The NSA layer replacing ``attn`` (a ``LlamaAttention``), on its device and in its dtype, with
        its q/k/v/o projection weights (and biases) copied."""
        weight = attn.q_proj.weight
        new = cls(attn.config, attn.layer_idx, device=weight.device, param_dtype=weight.dtype, **nsa_fields)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                ours, theirs = getattr(new.nsa, name), getattr(attn, name)
                ours.weight.copy_(theirs.weight)
                if ours.bias is not None:
                    ours.bias.copy_(theirs.bias)
        return new

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, position_ids=None, cache=None, **kwargs):
        """``(output [B, T, hidden], None)`` like ``LlamaAttention``; ``position_embeddings`` are not used
        (the layer rotates by each token's position within its sequence, see the module docstring).
        With an :class:`NSAModelCache` as ``past_key_values``: a prefill (empty cache) or a decode step
        (one new token per row) through this layer's ``NSAKVCache``; the mask's last T columns are the
        new tokens'. The cache arrives as ``past_key_values`` (transformers up to 5.2x) or ``cache``
        (later versions, which renamed it)."""
        if past_key_values is not None and cache is not None and past_key_values is not cache:
            fail(ValueError, "cache", "and past_key_values name the same thing: pass one", "both")
        past_key_values = cache if past_key_values is None else past_key_values
        if kwargs.get("past_key_value") is not None or \
                (past_key_values is not None and not isinstance(past_key_values, NSAModelCache)):
            fail(NotImplementedError, "past_key_values", "NSALlamaAttention keeps its keys in an NSAModelCache only: "
                                                         "pass one (greedy_with_cache does), or run the model with "
                                                         "use_cache=False (generate(..., use_cache=False))",
                 type(past_key_values or kwargs.get("past_key_value")).__name__)
        if attention_mask is not None and attention_mask.dim() != 2:
            fail(ValueError, "attention_mask", f"NSALlamaAttention takes the 2-D [B, T] padding mask; build the model's "
                                               f"masks with attn_implementation={ATTN_IMPLEMENTATION!r} (use_nsa does "
                                               "it)", f"shape {tuple(attention_mask.shape)}")
        if attention_mask is None and position_ids is not None and bool((position_ids.diff(dim=-1) < 0).any()):
            fail(ValueError, "position_ids", "restart inside a row (several sequences packed in one row): not "
                                             "supported, pass a padded batch with an attention_mask", "a restart")
        if past_key_values is not None:
            t = hidden_states.shape[1]
            mask = None if attention_mask is None else attention_mask[:, -t:]
            out = self.nsa(hidden_states, attention_mask=mask, cache=past_key_values.for_layer(self.layer_idx),
                           cache_seqs=past_key_values.seqs)
            past_key_values.advance(self.layer_idx, t)
            return out, None
        return self.nsa(hidden_states, attention_mask=attention_mask), None


class NSAModelCache:
    """The KV caches of a model's NSA layers for a batch of ``batch`` rows of up to ``max_len`` tokens,
    passed to the model as ``past_key_values``: layer i keeps its keys in ``caches[i]`` (an
    :class:`fsagen.NSAKVCache` from its layer's ``new_cache``; ``cache_kwargs`` go there), row b in
    slot b.

    ``seen`` counts the columns of the batch seen so far (the width of the padding mask that the
    next call extends): the model asks it for the mask sizes and positions (which the NSA layers do
    not use: they rotate by each row's cached length).  The first NSA layer of a call advances it
    once its step succeeded (a call it refuses leaves every cache as it was).
    """

    is_compileable = False

    def __init__(self, model, batch: int, max_len: int, **cache_kwargs):
        self.caches = {i: layer.self_attn.nsa.new_cache(batch, max_len, **cache_kwargs)
                       for i, layer in enumerate(model.model.layers) if isinstance(layer.self_attn, NSALlamaAttention)}
        if not self.caches:
            fail(ValueError, "model", "has no NSALlamaAttention layer (call use_nsa(model) first)", type(model).__name__)
        self.seqs = list(range(batch))
        self.seen = 0
        self._first = min(self.caches)

    def for_layer(self, layer_idx: int):
        """Layer ``layer_idx``'s cache."""
        if layer_idx not in self.caches:
            fail(KeyError, "layer_idx", f"has no cache here (NSA layers {sorted(self.caches)})", layer_idx)
        return self.caches[layer_idx]

    def advance(self, layer_idx: int, new_tokens: int) -> None:
        """Layer ``layer_idx`` took a call of ``new_tokens`` columns (counted once, by the first layer)."""
        if layer_idx == self._first:
            self.seen += new_tokens

    # what transformers asks of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  **kwargs):
    """transformers mask function of :data:`ATTN_IMPLEMENTATION`: the 2-D padding mask, unchanged."""
    if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, kv_length):
        fail(ValueError, "attention_mask", f"must be the [B, T] = {[batch_size, kv_length]} padding mask",
             f"shape {tuple(attention_mask.shape)}")
    return attention_mask


def _unswapped(module, *args, **kwargs):
    """transformers attention function of :data:`ATTN_IMPLEMENTATION`: reached only by a layer that still
    has its own attention (a swapped layer never calls it)."""
    raise RuntimeError(f"attn_implementation={ATTN_IMPLEMENTATION!r}: {type(module).__name__} was not replaced by "
                       "NSALlamaAttention (call use_nsa(model))")


def register() -> None:
    """Register :data:`ATTN_IMPLEMENTATION` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _unswapped)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)


def use_nsa(model, **nsa_fields):
    """Replace every decoder layer's ``self_attn`` of a Llama model by :class:`NSALlamaAttention` (keeping the
    projection weights), switch the model to :data:`ATTN_IMPLEMENTATION` and turn its KV cache off
    (``use_cache = False`` in its config and generation config: transformers' own caches do not fit the adapter;
    pass an :class:`NSAModelCache` to use one).  Returns the model."""
    register()
    for layer in model.model.layers:
        layer.self_attn = NSALlamaAttention.from_llama_attention(layer.self_attn, **nsa_fields)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    return model


# --------------------------------------------------------------------------- the example


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="markdown report to write (default: none)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per training row")
    p.add_argument("--pad", type=int, default=100, help="left padding of the second training row")
    p.add_argument("--prompt-len", type=int, default=2048, help="generation prompt length (longest row)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    # NSA spec (the defaults: NSASpec's)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--kernel-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--init-blocks", type=int, default=1)
    p.add_argument("--local-blocks", type=int, default=2)
    args = p.parse_args(argv)
    if args.batch < 1 or not 0 <= args.pad < args.seq_len:
        p.error("--batch must be >= 1 and 0 <= --pad < --seq-len")
    return args


def nsa_fields(args) -> dict:
    return dict(block_size=args.block_size, topk=args.topk, kernel_size=args.kernel_size, stride=args.stride,
                window_size=args.window, init_blocks=args.init_blocks, local_blocks=args.local_blocks)


def build_model(args, device):
    """A randomly initialised float32 LlamaForCausalLM (seeded) with NSA attention in every layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=max(args.seq_len, 8192), pad_token_id=0,
                         bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)  # no EOS: exactly
    # --new-tokens are generated, with no logits masked (the hand-written greedy loop masks none)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    return use_nsa(model, **nsa_fields(args))


def left_padded_batch(args, length: int, gen: torch.Generator, device):
    """(input_ids, attention_mask) ``[B, length]``: random tokens (3 .. vocab-1), row b left-padded by
    ``b * args.pad`` tokens (pad id 0)."""
    ids = torch.randint(3, args.vocab, (args.batch, length), generator=gen)
    mask = torch.ones(args.batch, length, dtype=torch.long)
    for b in range(args.batch):
        pad = min(b * args.pad, length - 1)
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def train_step(model, opt, ids, mask, device_type: str):
    """One AdamW step on the next-token loss (padding ignored); returns (loss before, loss after) of the batch."""
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())]
    if missing:
        raise RuntimeError(f"parameters without a finite gradient after backward: {missing[:5]}")
    opt.step()
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16):
        after = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return loss.detach(), after.detach()


@torch.no_grad()
def greedy_by_hand(model, ids, mask, new_tokens: int, device_type: str):
    """Greedy decoding the slow way: the whole prefix through the model for every new token.  Returns
    the tokens and the smallest gap between the best and second-best logit over the steps (a gap near
    0 is a near-tie, which run-to-run rounding differences, e.g. of float32 atomics, can flip)."""
    gap = float("inf")
    for _ in range(new_tokens):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        top2 = logits.topk(2, dim=-1).values
        gap = min(gap, float((top2[:, 0] - top2[:, 1]).min()))
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids, gap


@torch.no_grad()
def greedy_with_cache(model, ids, mask, new_tokens: int, device_type: str, **cache_kwargs):
    """Greedy decoding with the KV cache: the left-padded prompts ``ids``, ``mask [B, T]`` are
    prefilled through fsagen into an :class:`NSAModelCache` (one varlen prefill per layer), then each
    step feeds one token per row through the cache (a batched decode step per layer).  Returns the
    tokens ``[B, T + new_tokens]`` and the smallest gap between the two best logits of a step."""
    model.eval()
    cache = NSAModelCache(model, ids.shape[0], ids.shape[1] + new_tokens, **cache_kwargs)
    gap, step_ids, out = float("inf"), ids, [ids]
    for step in range(new_tokens):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            logits = model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1].float()
        top2 = logits.topk(2, dim=-1).values
        gap = min(gap, float((top2[:, 0] - top2[:, 1]).min()))
        step_ids = logits.argmax(-1, keepdim=True)
        out.append(step_ids)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.cat(out, dim=1), gap


@torch.no_grad()
def generate_with_cache(model, ids, mask, new_tokens: int, device_type: str, **cache_kwargs):
    """``model.generate`` greedy with an :class:`NSAModelCache` as its ``past_key_values``: the same
    prefill and decode steps as :func:`greedy_with_cache`, driven by transformers' own loop.
    Returns the tokens ``[B, T + new_tokens]``."""
    model.eval()
    cache = NSAModelCache(model, ids.shape[0], ids.shape[1] + new_tokens, **cache_kwargs)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              past_key_values=cache, use_cache=True, pad_token_id=0)


@torch.no_grad()
def generate(model, ids, mask, new_tokens: int, device_type: str):
    """``model.generate`` greedy, without a KV cache (each step recomputes the prefix through fsagen)."""
    model.eval()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              use_cache=False, pad_token_id=0)


def run(args, device) -> dict:
    """The example's steps on ``device``; returns the figures of the report."""
    device_type = torch.device(device).type
    model = build_model(args, device)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ids, mask = left_padded_batch(args, args.seq_len, gen, device)
    t0 = time.perf_counter()
    before, after = train_step(model, opt, ids, mask, device_type)
    train_s = time.perf_counter() - t0
    prompt, prompt_mask = left_padded_batch(args, args.prompt_len, gen, device)
    t0 = time.perf_counter()
    generated = generate(model, prompt, prompt_mask, args.new_tokens, device_type)
    gen_s = time.perf_counter() - t0
    by_hand, gap = greedy_by_hand(model, prompt, prompt_mask, args.new_tokens, device_type)
    _sync(device_type)
    t0 = time.perf_counter()
    cached, cache_gap = greedy_with_cache(model, prompt, prompt_mask, args.new_tokens, device_type)
    _sync(device_type)
    cache_s = time.perf_counter() - t0
    generated_cached = generate_with_cache(model, prompt, prompt_mask, args.new_tokens, device_type)
    t0 = time.perf_counter()
    greedy_by_hand(model, prompt, prompt_mask, args.new_tokens, device_type)  # timed as cached's baseline
    _sync(device_type)
    recompute_s = time.perf_counter() - t0
    return dict(params=sum(p.numel() for p in model.parameters()), loss_before=before.item(), loss_after=after.item(),
                train_s=train_s, generate_s=gen_s, new_tokens=generated[:, args.prompt_len:].tolist(),
                by_hand=by_hand[:, args.prompt_len:].tolist(), agree=torch.equal(generated, by_hand), gap=gap,
                cached=cached[:, args.prompt_len:].tolist(), cache_agree=torch.equal(cached, by_hand),
                generate_cache_agree=torch.equal(generated_cached, by_hand),
                cache_gap=min(gap, cache_gap), cache_s=cache_s, recompute_s=recompute_s,
                prompt_lengths=prompt_mask.sum(1).tolist(),
                nsa_layers=sum(isinstance(m, NSALlamaAttention) for m in model.modules()))


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def report(args, res: dict, device_name: str) -> str:
    import transformers

    lines = [f"# NativeSparseAttention in a transformers Llama model ({device_name})", "",
             f"transformers {transformers.__version__}, torch {torch.__version__}; LlamaForCausalLM, {args.layers} "
             f"layers, hidden {args.hidden}, {args.heads} query / {args.kv_heads} kv heads, vocab {args.vocab}, "
             f"{res['params'] / 1e6:.1f}M parameters (float32, bf16 autocast), random init (seed {args.seed}); "
             f"{res['nsa_layers']} attention layers replaced by NSALlamaAttention ({nsa_fields(args)}).", "",
             f"- training step: batch {args.batch} x {args.seq_len} tokens (row b left-padded by b*{args.pad}); "
             f"loss {res['loss_before']:.4f} before the AdamW step, {res['loss_after']:.4f} after "
             f"({res['train_s']:.1f} s including kernel loading)",
             f"- greedy generation, no KV cache (every step runs the whole prefix through fsagen), prompt "
             f"{args.prompt_len} tokens: {args.new_tokens} new tokens in {res['generate_s']:.1f} s",
             f"  - generate(): {res['new_tokens']}",
             f"  - hand-written greedy loop: {res['by_hand']}",
             f"  - identical: {'yes' if res['agree'] else 'NO'} (smallest gap between the two best logits of a "
             f"step: {res['gap']:.3g}; below {NEAR_TIE} a rounding difference may flip the argmax)",
             f"- greedy generation with the KV cache (prompts of {res['prompt_lengths']} real tokens, left-padded, "
             f"prefilled through fsagen into an NSAKVCache per layer; then one token per row per step through "
             f"fsagen.decode.nsa_decode): {args.new_tokens} new tokens in {res['cache_s']:.2f} s (recomputing the "
             f"prefix each step: {res['recompute_s']:.2f} s)",
             f"  - with the cache: {res['cached']}",
             f"  - identical to the recomputing loop: {'yes' if res['cache_agree'] else 'NO'} (smallest gap between "
             f"the two best logits of a step in either run: {res['cache_gap']:.3g})",
             f"  - model.generate(past_key_values=NSAModelCache(...)) identical to the recomputing loop: "
             f"{'yes' if res['generate_cache_agree'] else 'NO'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("llama_nsa.py needs a CUDA GPU (the fsagen kernels are CUDA-only)", file=sys.stderr)
        return 1
    res = run(args, "cuda")
    text = report(args, res, torch.cuda.get_device_name())
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    problems = []
    if not res["loss_after"] < res["loss_before"]:
        problems.append("the loss did not fall after the training step")
    if not res["agree"] and res["gap"] >= NEAR_TIE:
        problems.append("generate() and the greedy loop differ with no near-tie to explain it")
    if not (res["cache_agree"] and res["generate_cache_agree"]) and res["cache_gap"] >= NEAR_TIE:
        problems.append("greedy generation with the KV cache differs from recomputing the prefix with no near-tie "
                        "to explain it")
    print("OK" if not problems else "CHECK: " + "; ".join(problems))
    return 0 if not problems else 3


if __name__ == "__main__":
    sys.exit(main())
