"""Golden fixtures for SDXL's two text encoders and its conditioning vectors (Tests/SDXLTests/TextEncoderTests.swift).

Run from the repository root (PyTorch, transformers, diffusers and open_clip_torch installed; CPU, fp32):

    python3 Tests/Fixtures/sdxl/make_text.py

Writes, next to this script:

  text_tiny.safetensors  a tiny SDXL text conditioner in the single-file (sgm) key space:
      conditioner.embedders.0.transformer.text_model.*  tiny transformers CLIPTextModel (quick-GELU), the CLIP ViT-L
                                                         role, with its `embeddings.position_ids` buffer as some files have
      conditioner.embedders.1.model.*                    tiny CLIPTextModelWithProjection (GELU) converted to OpenCLIP's
                                                         layout (the ViT-bigG role), with `logit_scale`
  text_io.safetensors    token ids and transformers' / diffusers' / kohya's outputs for them (keys listed in `main`).

Every parameter is re-initialised from a seeded generator (nothing is zero or one). The vocabulary is small (512), so
BOS/EOS are 510/511 (the real 49406/49407 do not fit); L pads with EOS, G pads with 0, as SDXL's two tokenizers do.
The OpenCLIP conversion is cross-checked against open_clip's own TextTransformer loaded with the converted tensors.
"""

import json
import os

import torch
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB, BOS, EOS = 512, 510, 511
POSITIONS = 77
PREFIX_L = "conditioner.embedders.0.transformer.text_model."   # + transformers' CLIPTextTransformer names
PREFIX_G = "conditioner.embedders.1.model."          # + OpenCLIP names

CONFIG_L = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=POSITIONS, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
CONFIG_G = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
                max_position_embeddings=POSITIONS, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=48,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)


def reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Seeded, nonzero values everywhere: norms 1 + noise, biases small, matrices ~N(0, 1/fan_in), embeddings wider."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def to_openclip(sd: dict) -> dict:
    """transformers CLIPTextModelWithProjection state dict -> OpenCLIP text tower names (sgm's FrozenOpenCLIPEmbedder2),
    the inverse of diffusers' convert_open_clip_checkpoint. Asserts every tensor is mapped exactly once."""
    out, used = {}, set()

    def take(src, dst, transform=lambda x: x):
        used.add(src)
        out[dst] = transform(sd[src]).contiguous()

    take("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
    take("text_model.embeddings.position_embedding.weight", "positional_embedding")
    for i in range(CONFIG_G["num_hidden_layers"]):
        s, d = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            used.update(s + f"self_attn.{n}_proj.{p}" for n in "qkv")
            out[d + f"attn.in_proj_{p}"] = torch.cat([sd[s + f"self_attn.{n}_proj.{p}"] for n in "qkv"]).contiguous()
            take(s + f"self_attn.out_proj.{p}", d + f"attn.out_proj.{p}")
            take(s + f"layer_norm1.{p}", d + f"ln_1.{p}")
            take(s + f"layer_norm2.{p}", d + f"ln_2.{p}")
            take(s + f"mlp.fc1.{p}", d + f"mlp.c_fc.{p}")
            take(s + f"mlp.fc2.{p}", d + f"mlp.c_proj.{p}")
    take("text_model.final_layer_norm.weight", "ln_final.weight")
    take("text_model.final_layer_norm.bias", "ln_final.bias")
    # nn.Linear keeps [P, C] and computes x @ W.T; OpenCLIP keeps the [C, P] parameter and computes x @ text_projection.
    take("text_projection.weight", "text_projection", lambda w: w.T)
    unmapped = set(sd) - used - {"text_model.embeddings.position_ids"}
    assert not unmapped, f"tensors the OpenCLIP mapping does not cover: {sorted(unmapped)}"
    return out


def check_with_open_clip(open_clip, g_openclip: dict, ids_g: torch.Tensor, penultimate: torch.Tensor, pooled: torch.Tensor) -> None:
    """Runs open_clip's TextTransformer on the converted tensors as sgm's FrozenOpenCLIPEmbedder2 does (penultimate =
    output of all blocks but the last, no ln_final; pooled = ln_final(last) at argmax(ids) @ text_projection)."""
    c = CONFIG_G
    tower = open_clip.transformer.TextTransformer(
        context_length=POSITIONS, vocab_size=VOCAB, width=c["hidden_size"], heads=c["num_attention_heads"],
        layers=c["num_hidden_layers"], output_dim=c["projection_dim"], act_layer=torch.nn.GELU)
    state = {k: v for k, v in g_openclip.items() if k != "logit_scale"}
    tower.load_state_dict(state, strict=True)
    with torch.no_grad():
        x = tower.token_embedding(ids_g) + tower.positional_embedding
        mask = tower.attn_mask
        blocks = tower.transformer.resblocks
        batch_first = getattr(tower.transformer, "batch_first", True)
        if not batch_first:
            x = x.permute(1, 0, 2)
        for block in blocks[:-1]:
            x = block(x, attn_mask=mask)
        penult = x if batch_first else x.permute(1, 0, 2)
        x = blocks[-1](x, attn_mask=mask)
        last = tower.ln_final(x if batch_first else x.permute(1, 0, 2))
        pool = last[torch.arange(last.shape[0]), ids_g.argmax(dim=-1)] @ tower.text_projection
    torch.testing.assert_close(penult, penultimate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool, pooled, rtol=1e-5, atol=1e-5)


def prompt_ids(tokens: list, pad: int) -> list:
    """One 77-id chunk: BOS, tokens, EOS, then padding (SDXL's tokenizers with max_length 77)."""
    ids = [BOS] + tokens[:POSITIONS - 2] + [EOS]
    return ids + [pad] * (POSITIONS - len(ids))


def kohya_chunks(tokens: list, pad: int, max_token_length: int) -> list:
    """kohya's TokenizeStrategy._get_input_ids for max_length > 77 (library/strategy_base.py): tokenise to
    max_token_length + 2, then cut into n = max_token_length // 75 chunks <BOS> ids[i:i+75] <last id>, fixing the ends
    when pad != eos (the "v2 or SDXL" branch)."""
    max_length = max_token_length + 2                        # SdxlTokenizeStrategy: self.max_length = max_length + 2
    full = [BOS] + tokens[:max_length - 2] + [EOS]
    full += [pad] * (max_length - len(full))
    chunks = []
    for i in range(1, max_length - POSITIONS + 2, POSITIONS - 2):   # 150: i = 1, 76; 225: i = 1, 76, 151
        chunk = [full[0]] + full[i:i + POSITIONS - 2] + [full[-1]]
        if pad != EOS:
            if chunk[-2] != EOS and chunk[-2] != pad:
                chunk[-1] = EOS
            if chunk[1] == pad:
                chunk[1] = EOS
        chunks.append(chunk)
    assert len(chunks) == max_token_length // 75 and all(len(c) == POSITIONS for c in chunks)
    return chunks


def kohya_pool_workaround(model: CLIPTextModelWithProjection, last_hidden_state, input_ids, eos_token_id):
    """kohya's pool_workaround (library/train_util.py): first EOS position of each row, then text_projection."""
    eos_token_index = torch.argmax((input_ids == eos_token_id).int(), dim=1)
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0]), eos_token_index]
    return model.text_projection(pooled)


def kohya_stitch(hidden: torch.Tensor, b_size: int, max_token_length: int) -> torch.Tensor:
    """The stitching of kohya's get_hidden_states_sdxl: [b*n, 77, C] -> [b, 75n + 2, C]."""
    hidden = hidden.reshape((b_size, -1, hidden.shape[-1]))
    states = [hidden[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, POSITIONS):
        states.append(hidden[:, i:i + POSITIONS - 2])
    states.append(hidden[:, -1].unsqueeze(1))
    return torch.cat(states, dim=1)


def main() -> None:
    torch.manual_seed(0)
    model_l = CLIPTextModel(CLIPTextConfig(**CONFIG_L, attn_implementation="eager")).eval()
    model_g = CLIPTextModelWithProjection(CLIPTextConfig(**CONFIG_G, attn_implementation="eager")).eval()
    reinitialise(model_l, 1)
    reinitialise(model_g, 2)

    # transformers 5's CLIPTextModel holds embeddings/encoder/final_layer_norm itself (4.x nested them under
    # `text_model.`, the names SDXL files use): strip either form down to the CLIPTextTransformer names.
    sd_l = {k.removeprefix("text_model."): v for k, v in model_l.state_dict().items()}
    weights = {PREFIX_L + k: v.contiguous() for k, v in sd_l.items()}
    position_ids_key = PREFIX_L + "embeddings.position_ids"
    if position_ids_key not in weights:   # recent transformers no longer save it; some SDXL files still carry it
        weights[position_ids_key] = torch.arange(POSITIONS, dtype=torch.int64).unsqueeze(0)
    g_openclip = to_openclip(model_g.state_dict())
    g_openclip["logit_scale"] = torch.tensor(4.6052)   # ln(100), as trained CLIP models hold; never used by SDXL
    weights.update({PREFIX_G + k: v for k, v in g_openclip.items()})
    save_file(weights, os.path.join(HERE, "text_tiny.safetensors"),
              metadata={"code": "make_text.py", "config_l": json.dumps(CONFIG_L), "config_g": json.dumps(CONFIG_G)})

    gen = torch.Generator().manual_seed(3)
    token_lists = [torch.randint(0, BOS, (n,), generator=gen).tolist() for n in (9, 31)]
    ids_l = torch.tensor([prompt_ids(t, EOS) for t in token_lists])
    ids_g = torch.tensor([prompt_ids(t, 0) for t in token_lists])
    io = {"ids_l": ids_l, "ids_g": ids_g}

    with torch.no_grad():
        out_l = model_l(ids_l, output_hidden_states=True)
        out_g = model_g(ids_g, output_hidden_states=True)
    assert len(out_l.hidden_states) == CONFIG_L["num_hidden_layers"] + 1
    io["l_penultimate"] = out_l.hidden_states[-2]                      # [2, 77, 32], no final_layer_norm
    io["g_penultimate"] = out_g.hidden_states[-2]                      # [2, 77, 48], no ln_final
    io["g_pooled"] = out_g.text_embeds                                 # [2, 48]
    io["context"] = torch.cat([io["l_penultimate"], io["g_penultimate"]], dim=-1)
    try:
        import open_clip  # needs torchvision, whose wheels pin a torch version other than the reference 2.13
    except Exception as error:  # noqa: BLE001 - any import failure means the optional cross-check cannot run
        print(f"open_clip unavailable ({error}); skipping the cross-check against open_clip's TextTransformer")
    else:
        check_with_open_clip(open_clip, g_openclip, ids_g, io["g_penultimate"], io["g_pooled"])
    # Rows padded with EOS (tokenizer 1's padding) hold many EOS: transformers pools at the FIRST one.
    with torch.no_grad():
        io["g_pooled_eos_padded"] = model_g(ids_l).text_embeds

    # kohya loading a single-file checkpoint (sdxl_model_util.convert_sdxl_text_encoder_2_checkpoint) copies
    # `text_projection` into nn.Linear's weight WITHOUT transposing it, so its pooled vector is x @ text_projectionᵀ.
    # Recorded so the Swift option that reproduces it is tested; it only exists for square projections (bigG: 1280²).
    with torch.no_grad():
        as_kohya = CLIPTextModelWithProjection(CLIPTextConfig(**CONFIG_G, attn_implementation="eager")).eval()
        hf_sd = model_g.state_dict()
        hf_sd["text_projection.weight"] = g_openclip["text_projection"].clone()
        as_kohya.load_state_dict(hf_sd, strict=True)
        out_k = as_kohya(ids_g, output_hidden_states=True)
        io["g_pooled_kohya_single_file"] = kohya_pool_workaround(as_kohya, out_k.last_hidden_state, ids_g, EOS)
    assert not torch.allclose(io["g_pooled_kohya_single_file"], io["g_pooled"], atol=1e-3)

    # y: diffusers' StableDiffusionXLPipeline / UNet2DConditionModel "text_time" add embedding:
    # add_time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) over time_ids.flatten().
    time_ids = torch.tensor([[1216.0, 832.0, 0.0, 16.0, 1024.0, 1024.0],      # original h, w, crop top, left, target h, w
                             [512.0, 683.0, 48.0, 0.0, 896.0, 1152.0]])
    io["time_ids"] = time_ids
    time_embeds = get_timestep_embedding(time_ids.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    io["y"] = torch.cat([io["g_pooled"], time_embeds.reshape(time_ids.shape[0], -1)], dim=-1)   # [2, 48 + 1536]

    # Backward through the L encoder: its position embedding made trainable, loss = Σ penultimate · seed.
    seed = torch.randn(io["l_penultimate"].shape, generator=gen)
    position_embedding = (model_l.text_model if hasattr(model_l, "text_model") else model_l).embeddings.position_embedding
    position_embedding.weight.requires_grad_(True)
    model_l.zero_grad()
    penult = model_l(ids_l, output_hidden_states=True).hidden_states[-2]
    (penult * seed).sum().backward()
    io["l_grad_seed"] = seed
    io["l_position_embedding_grad"] = position_embedding.weight.grad.clone()

    # Long captions: kohya with max_token_length 150 -> 2 chunks per prompt, encoded separately and stitched
    # (get_hidden_states_sdxl in library/strategy_sdxl.py / train_util.py), pooled from each prompt's first chunk.
    max_token_length = 150
    long_tokens = [torch.randint(0, BOS, (n,), generator=gen).tolist() for n in (100, 40)]
    chunks_l = torch.tensor([kohya_chunks(t, EOS, max_token_length) for t in long_tokens])   # [2, 2, 77]
    chunks_g = torch.tensor([kohya_chunks(t, 0, max_token_length) for t in long_tokens])
    io["long_ids_l"], io["long_ids_g"] = chunks_l, chunks_g
    b_size = chunks_l.shape[0]
    with torch.no_grad():
        enc1 = model_l(chunks_l.reshape(-1, POSITIONS), output_hidden_states=True)
        enc2 = model_g(chunks_g.reshape(-1, POSITIONS), output_hidden_states=True)
        hidden1 = kohya_stitch(enc1.hidden_states[-2], b_size, max_token_length)
        hidden2 = kohya_stitch(enc2.hidden_states[-2], b_size, max_token_length)
        pool2 = kohya_pool_workaround(model_g, enc2.last_hidden_state, chunks_g.reshape(-1, POSITIONS), EOS)
        n_size = max_token_length // 75
        pool2 = pool2[::n_size]
    assert hidden1.shape[1] == 75 * n_size + 2
    io["long_context"] = torch.cat([hidden1, hidden2], dim=2)   # [2, 152, 80]
    io["long_pooled"] = pool2                                   # [2, 48]

    io = {k: v.contiguous() for k, v in io.items()}
    save_file(io, os.path.join(HERE, "text_io.safetensors"), metadata={"code": "make_text.py"})
    for name in ("text_tiny.safetensors", "text_io.safetensors"):
        print(name, os.path.getsize(os.path.join(HERE, name)), "bytes")


if __name__ == "__main__":
    main()
