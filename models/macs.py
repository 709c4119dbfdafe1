"""Multiply-accumulates of one forward pass (batch 1), counted as the EDT reference counts them:
every Linear and the patch projection, plus the two attention matmuls; embeddings lookups,
norms, activations and bias additions are free. These are the paper's "GFLOPs"."""


def linear_macs(linear, tokens=1):
    return tokens * linear.weight.numel()


def block_macs(block, tokens=None):
    """MACs of one block over `tokens` tokens (default: its whole grid)."""
    tokens = tokens or block.attn.grid_size ** 2
    dim = block.attn.proj.in_features
    attention_matmuls = 2 * tokens * tokens * dim  # q k^T and probs @ v over all heads
    token_linears = [block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2]
    if getattr(block, "skip_linear", None) is not None:  # MDT's long skips
        token_linears.append(block.skip_linear)
    return (linear_macs(block.adaLN_modulation[1]) + attention_matmuls
            + sum(linear_macs(layer, tokens) for layer in token_linears))


def count_macs(model):
    """MACs of `model.forward` for one sample; works on meta-device models."""
    tokens = model.pos_embed.shape[1]
    t_mlp = model.t_embedder.mlp
    total = tokens * model.x_embedder.proj.weight.numel()
    total += linear_macs(t_mlp[0]) + linear_macs(t_mlp[2])
    total += linear_macs(model.final_layer.adaLN_modulation[1]) + linear_macs(model.final_layer.linear, tokens)
    total += sum(block_macs(block) for block in model.blocks)
    for down in getattr(model, "down_blocks", ()):
        total += linear_macs(down.adaLN_modulation[1]) + linear_macs(down.reduction, (down.grid_size // 2) ** 2)
    for up in getattr(model, "up_blocks", ()):
        total += linear_macs(up.expand, up.grid_size ** 2)
    for concat in getattr(model, "concat_blocks", ()):
        total += linear_macs(concat.adaLN_modulation[1]) + linear_macs(concat.cat, concat.grid_size ** 2)
    return total


def count_masked_macs(model, kept_fraction):
    """MACs of one masked training forward (batch 1). EDT masks by zeroing tokens, as many MACs as
    a full forward. MDTv2's encoder blocks see kept_fraction of the tokens, and its
    side-interpolater block runs on all of them."""
    encoder = list(getattr(model, "en_inblocks", ())) + list(getattr(model, "en_outblocks", ()))
    if not encoder:
        return count_macs(model)
    kept = int(model.pos_embed.shape[1] * kept_fraction)
    saved = sum(block_macs(block) - block_macs(block, kept) for block in encoder)
    return count_macs(model) - saved + sum(block_macs(block) for block in model.sideblocks)


def count_trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
