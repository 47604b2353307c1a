#!/usr/bin/env bash
# Builds .gpu/transformers-py312.tar.xz: transformers (for examples/llama_nsa.py) and the packages it
# needs, unpacked wheels for the GPU machine's Python 3.12 (it has no network). To keep the archive
# small beside the TileLang bundle (everything carried must fit in 64 MiB), transformers/models keeps
# only the Llama model and what it imports (import transformers and LlamaForCausalLM work; other
# models do not), and the packages named below are left out. Checked: tests/test_llama_nsa.py passes
# in a fresh venv holding only torch, numpy and pytest, with the bundle built for Python 3.11 on its path.
# bench/run_gpu.sh unpacks it when `import transformers` fails there, and puts it at the END of
# PYTHONPATH, so the machine's own numpy, packaging, filelock, ... win over the bundle's copies.
# Usage (on the CPU machine, a minute or two): bench/hf_bundle.sh [OUT_DIR=.gpu] [PYTHON_VERSION=3.12]
set -euo pipefail
out=${1:-.gpu}; pyver=${2:-3.12}
mkdir -p "$out"; out=$(cd "$out" && pwd)
tag=${pyver//./}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$work/whl" "transformers==5.18.0"
site="$work/site-hf$tag"
mkdir -p "$site"
for w in "$work"/whl/*.whl; do (cd "$site" && python3 -m zipfile -e "$w" .); done
# llama and auto, and the models whose tokenizers transformers' GGUF table imports when the Llama
# config loads (found by trial with transformers 5.18.0)
keep="llama auto gemma gpt2 qwen2 qwen3_5 t5"
for d in "$site"/transformers/models/*/; do
  case " $keep " in *" $(basename "$d") "*) ;; *) rm -rf "$d" ;; esac
done
# Not carried: numpy (the GPU machine's torch environment has it), hf_xet (hub downloads only) and the
# command-line stack of `transformers` / `hf` (typer, click, rich, pygments, markdown-it, shellingham).
for pkg in numpy numpy.libs hf_xet typer click rich pygments markdown_it mdurl shellingham; do
  rm -rf "${site:?}/$pkg" "$site/$pkg"-*.dist-info "$site/${pkg//_/-}"-*.dist-info
done
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
tar -C "$work" -cf - "site-hf$tag" | xz -T2 -9 > "$out/transformers-py$tag.tar.xz"
ls -la "$out/transformers-py$tag.tar.xz"
