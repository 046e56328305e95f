"""Random LoRA adapters (PEFT, installed as diffusers' load_lora_adapter installs them) for the step bench's
"-lora<rank>" providers and tests/test_lora.py: nothing is downloaded, and B is not left at PEFT's zero init."""
import torch

# What the published Wan LoRAs adapt (e.g. the step-distillation ones): every block's self- and cross-attention
# projections and both FFN Linears (a full match, as PEFT reads a string).
BLOCK_LINEARS = r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*blocks\.\d+\.ffn\.net\.(0\.proj|2)"


def add_random_lora(model, rank, target_modules=BLOCK_LINEARS, size=0.1, name="lora", seed=1):
    """Adds adapter `name` of `rank` to `model`'s target Linears, with random A and B, B scaled so that each layer's
    B @ A (times PEFT's scaling, 1 here) is `size` times the norm of the layer's weight. Returns the model."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, init_lora_weights=False),
                      name)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_A") and name in layer.lora_A:
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                b *= size * layer.base_layer.weight.norm() / (b @ a).norm()
    return model
