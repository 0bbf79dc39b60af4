"""Which Hugging Face ``transformers`` architectures go through quantize -> compile (llvm).

Run: python -m bench.hf_architectures [name ...]    (needs the [hf] extra: transformers)

Each model is built from a small config with random weights (2 layers, hidden 32, 4 heads:
the code paths of the full models, in seconds), called with the keyword inputs
``input_ids`` and ``attention_mask`` as one dict (ViT: ``pixel_values``), quantized (``assign="variance"``,
``rounding="nearest"``), compiled for this CPU and compared with the quantized torch model.
Prints one line per architecture: the RMSMP layers and the largest absolute difference of the
compiled model's last hidden state, or the error.
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings

import numpy as np
import torch


def _cases():
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    return {
        "BertModel": lambda: T.BertModel(T.BertConfig(**small), add_pooling_layer=False),
        "RobertaModel": lambda: T.RobertaModel(T.RobertaConfig(**small, pad_token_id=1), add_pooling_layer=False),
        "DistilBertModel": lambda: T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                        vocab_size=100)),
        "ElectraModel": lambda: T.ElectraModel(T.ElectraConfig(embedding_size=32, **small)),
        "AlbertModel": lambda: T.AlbertModel(T.AlbertConfig(embedding_size=16, **small), add_pooling_layer=False),
        "T5EncoderModel": lambda: T.T5EncoderModel(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                              vocab_size=100)),
        "LlamaModel": lambda: T.LlamaModel(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         vocab_size=100, use_cache=False)),
        "GPT2Model": lambda: T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                                      use_cache=False)),
        "ViTModel": lambda: T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, image_size=16, patch_size=4),
                                       add_pooling_layer=False),
    }


def run(name: str, build) -> str:
    import tvm_rmsmp as rmsmp

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if name == "ViTModel":
        model = build().eval()
        x = (torch.randn(2, 3, 16, 16),)
        calib = [{"pixel_values": torch.randn(4, 3, 16, 16)} for _ in range(2)]
    else:
        model = build().eval()
        ids = torch.randint(3, 90, (2, 8))
        mask = torch.ones(2, 8, dtype=torch.int64)
        mask[1, 6:] = 0
        x = {"input_ids": ids, "attention_mask": mask}  # keyword inputs, as a tokenizer gives them
        calib = [x]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(assign="variance", rounding="nearest"), calib)
        with torch.no_grad():
            ref = (q(**x) if isinstance(x, dict) else q(*x)).last_hidden_state.numpy()
        exe = rmsmp.compile(q, x)
        out = exe(x) if isinstance(x, dict) else exe(*x)
    y = out["last_hidden_state"]
    return (f"{len(rmsmp.row_plans(q))} RMSMP layers, max |compiled - torch| {np.abs(y - ref).max():.1e}, "
            f"{time.perf_counter() - t0:.0f} s")


def main(argv=None):
    names = list(argv if argv is not None else sys.argv[1:])
    cases = _cases()
    for name in names or list(cases):
        try:
            result = "ok: " + run(name, cases[name])
        except Exception as err:  # noqa: BLE001 - reported per architecture
            result = f"FAILS: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            traceback.print_exc(file=sys.stderr)
        print(f"{name}: {result}", flush=True)


if __name__ == "__main__":
    main()
