"""fl.Attention equals torch.nn.MultiheadAttention on the same weights."""

import pytest
import torch

import fluxion.layers as fl


def copy_mha_weights(mha: torch.nn.MultiheadAttention, attention: fl.Attention) -> None:
    q, k, v = attention.Distribute[0], attention.Distribute[1], attention.Distribute[2]
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        for linear, weight, bias in ((q, wq, bq), (k, wk, bk), (v, wv, bv)):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        attention.Linear.weight.copy_(mha.out_proj.weight)
        attention.Linear.bias.copy_(mha.out_proj.bias)


@pytest.mark.parametrize("mode", ["self", "cross"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_multihead_attention(mode, masked):
    torch.manual_seed(0)
    dim, heads, kdim = 16, 4, (16 if mode == "self" else 12)
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True, kdim=kdim, vdim=kdim)
    attention = fl.Attention(dim, heads, key_embedding_dim=kdim, value_embedding_dim=kdim, use_mask=masked)
    copy_mha_weights(mha, attention)
    query = torch.randn(2, 5, dim)
    context = query if mode == "self" else torch.randn(2, 7, kdim)
    if masked:
        blocked = torch.rand(query.shape[1], context.shape[1]) < 0.3
        blocked[:, 0] = False  # every query attends to something
        expected, _ = mha(query, context, context, attn_mask=blocked, need_weights=False)
        actual = attention(query, context, context, ~blocked)  # ours: True = attend, like SDPA
    else:
        expected, _ = mha(query, context, context, need_weights=False)
        actual = attention(query, context, context)
    assert (actual - expected).abs().max().item() < 1e-6


def test_self_attention_with_causal_mask_equals_mha():
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    attention = fl.SelfAttention(8, 2, is_causal=True)
    copy_mha_weights(mha, attention)
    x = torch.randn(3, 6, 8)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    expected, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    assert (attention(x) - expected).abs().max().item() < 1e-6


def test_self_attention_with_mask_input():
    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    attention = fl.SelfAttention(8, 2, use_mask=True)
    copy_mha_weights(mha, attention)
    x = torch.randn(1, 4, 8)
    blocked = torch.tensor([[False, True, True, True]] * 4)
    expected, _ = mha(x, x, x, attn_mask=blocked, need_weights=False)
    assert (attention(x, ~blocked) - expected).abs().max().item() < 1e-6


def test_self_attention_2d_equals_token_attention():
    torch.manual_seed(3)
    layer = fl.SelfAttention2d(8, num_heads=2)
    tokens = fl.SelfAttention(8, 2)
    tokens.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 3, 5)
    expected = tokens(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(layer(x), expected, atol=1e-6)
