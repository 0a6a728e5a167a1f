"""Expected memory and compute of configs/vlm-qwen2.5-vl-3b.yaml, from parameter counts.

Builds Qwen2.5-VL-3B-Instruct's architecture on the meta device (no weights, no hub:
the config values are those of the published config.json) and counts the parameters
that ``model.trainable: lm`` trains (the language model) and freezes (vision tower +
merger/projector). Then prints, per GPU of one branch:

- weights + gradients + AdamW state for full fine-tuning of the LM with float32 master
  weights (16 bytes per trained parameter: weight 4, gradient 4, Adam m and v 8) and
  the frozen part held in the load dtype;
- the same in pure bf16 weights (the Trainer's default when the model loads in bf16);
- training FLOPs per million tokens (6 · N_trained per token for the LM; the frozen
  vision tower costs a forward pass, 2 · N_vision per image patch) and the time at an
  assumed model-FLOPs utilisation.

Run: .venv/bin/python bench/vlm_memory.py [--tokens-per-branch 2e7] [--mfu 0.35]
"""

from __future__ import annotations

import argparse

QWEN25_VL_3B = {
    "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
                    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    "tie_word_embeddings": True,
}
H100_BF16_DENSE = 989e12  # FLOP/s, SXM, dense


def counts() -> dict[str, int]:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from merit_core.vlm import parameter_counts

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_3B))
    return parameter_counts(model, "lm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens-per-branch", type=float, default=2e7, help="training tokens of one branch")
    ap.add_argument("--image-patches-per-token", type=float, default=1.0,
                    help="vision patches (before the 2×2 merge) per training token")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOPs utilisation")
    a = ap.parse_args()
    c = counts()
    gib = 1024**3
    trained, frozen = c["trainable"], c["frozen"]
    print(f"Qwen2.5-VL-3B, model.trainable=lm: {trained / 1e9:.3f} B trained (language model), "
          f"{frozen / 1e9:.3f} B frozen (vision tower + merger), {(trained + frozen) / 1e9:.3f} B in all")
    fp32_master = (16 * trained + 4 * frozen) / gib
    bf16_only = (2 * trained + 2 * trained + 8 * trained + 2 * frozen) / gib
    print(f"weights+grads+AdamW, float32 master weights (model.dtype float32, train.bf16 autocast): {fp32_master:.1f} GiB")
    print(f"weights+grads+AdamW, bf16 weights and grads, float32 Adam state (model.dtype bfloat16): {bf16_only:.1f} GiB")
    print(f"  ZeRO-2 over 8 GPUs (grads and Adam state sharded, float32 master): "
          f"{(4 * trained + 4 * frozen + 12 * trained / 8) / gib:.1f} GiB per GPU, plus activations")
    flops_tok = 6 * trained + 2 * frozen * a.image_patches_per_token
    print(f"training FLOPs per token: {flops_tok:.3e}; per 1M tokens: {flops_tok * 1e6:.3e}")
    sec = flops_tok * a.tokens_per_branch / (H100_BF16_DENSE * a.mfu)
    print(f"one branch of {a.tokens_per_branch:.2e} tokens on one H100 at {a.mfu:.0%} MFU: {sec / 3600:.2f} h")
    print("reproduce: .venv/bin/python bench/vlm_memory.py "
          f"--tokens-per-branch {a.tokens_per_branch:g} --image-patches-per-token {a.image_patches_per_token:g} "
          f"--mfu {a.mfu:g}")


if __name__ == "__main__":
    main()
