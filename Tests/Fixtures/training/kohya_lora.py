"""Shared by make_train_step.py and check_diffusers_lora.py: the tiny SDXL UNet in diffusers with its
single-file (LDM) weights, and a kohya `networks/lora.py` LoRA network on it, written in kohya's LDM
module naming.

kohya-ss/sd-scripts trains SDXL on its own LDM-layout UNet (library/sdxl_original_unet.py), so its LoRA
names are `lora_unet_` + the LDM module path with "." → "_". Here the model is diffusers'
`UNet2DConditionModel`; each target module is found in diffusers' tree the way kohya finds it in its own
(the Linear/Conv2d children of the target blocks) and named through `diffusers_to_ldm` from
Tests/Fixtures/sdxl/make_unet.py, so the names are the ones kohya would give.

kohya's target blocks (networks/lora.py, `LoRANetwork`):
  UNET_TARGET_REPLACE_MODULE            ["Transformer2DModel"]      always: every Linear inside
  UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 ["ResnetBlock2D", "Downsample2D", "Upsample2D"]  only with conv_dim
Within a target block a Linear or 1×1 Conv2d gets (network_dim, network_alpha); a 3×3 Conv2d gets
(conv_dim, conv_alpha). The diffusers classes have the same names as kohya's, and the same Linear/Conv2d
children (ResnetBlock2D: conv1=in_layers.2, time_emb_proj=emb_layers.1, conv2=out_layers.3,
conv_shortcut=skip_connection; Downsample2D.conv=op; Upsample2D.conv=conv).

`LoRAModule` is kohya's LoRAModule without the dropouts (none are used here): it replaces the original
module's forward with  org(x) + lora_up(lora_down(x)) · multiplier · (alpha / rank), where for a 3×3 conv
lora_down is a 3×3 conv with the original stride and padding and lora_up a 1×1 conv.
"""

import json
import math
import os
import sys

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
SDXL_FIXTURES = os.path.normpath(os.path.join(HERE, "..", "sdxl"))
sys.path.insert(0, SDXL_FIXTURES)
import make_unet  # noqa: E402  (Tests/Fixtures/sdxl/make_unet.py: build_model, diffusers_to_ldm, forward_with_emb)

LDM_PREFIX = "model.diffusion_model."
UNET_TINY = os.path.join(SDXL_FIXTURES, "unet_tiny.safetensors")
UNET_IO = os.path.join(SDXL_FIXTURES, "unet_io.safetensors")

LINEAR_BLOCKS = (Transformer2DModel,)
CONV_BLOCKS = (ResnetBlock2D, Downsample2D, Upsample2D)


def has_attention_up(model):
    return [hasattr(b, "attentions") for b in model.up_blocks]


def load_tiny_unet(path=UNET_TINY):
    """The tiny diffusers UNet (make_unet.build_model) with the weights of an LDM single-file UNet.
    Every LDM key must map to exactly one diffusers parameter and back: a file of another shape or
    topology fails here, naming the key."""
    model = make_unet.build_model().float().eval()
    up_attn = has_attention_up(model)
    ldm_to_diffusers = {LDM_PREFIX + make_unet.diffusers_to_ldm(k, up_attn): k for k in model.state_dict()}
    sd = {}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        missing = sorted(set(ldm_to_diffusers) - keys)
        extra = sorted(keys - set(ldm_to_diffusers))
        if missing or extra:
            raise SystemExit(f"{path}: not the tiny SDXL UNet of Tests/Fixtures/sdxl/make_unet.py: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        for lk, dk in ldm_to_diffusers.items():
            sd[dk] = f.get_tensor(lk).float()
    model.load_state_dict(sd, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lora_targets(model, conv=True):
    """[(lora_name, diffusers module path, module, is_conv3x3)] in diffusers' module order, as kohya's
    create_modules walks its own tree: each target block, then its Linear/Conv2d descendants."""
    up_attn = has_attention_up(model)
    blocks = LINEAR_BLOCKS + (CONV_BLOCKS if conv else ())
    targets = []
    for name, block in model.named_modules():
        if not isinstance(block, blocks):
            continue
        for child_name, child in block.named_modules():
            is_linear = child.__class__.__name__ == "Linear"
            is_conv = child.__class__.__name__ == "Conv2d"
            if not (is_linear or is_conv):
                continue
            path = f"{name}.{child_name}"
            ldm = make_unet.diffusers_to_ldm(path + ".weight", up_attn)[: -len(".weight")]
            lora_name = "lora_unet_" + ldm.replace(".", "_")
            targets.append((lora_name, path, child, is_conv and child.kernel_size != (1, 1)))
    names = [t[0] for t in targets]
    assert len(set(names)) == len(names), "duplicate LoRA names"
    return targets


class LoRAModule(torch.nn.Module):
    """kohya networks/lora.py LoRAModule (no dropout): wraps `org_module.forward`."""

    def __init__(self, lora_name, org_module, multiplier, lora_dim, alpha):
        super().__init__()
        self.lora_name = lora_name
        if org_module.__class__.__name__ == "Conv2d":
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.lora_down = torch.nn.Conv2d(in_dim, lora_dim, org_module.kernel_size, org_module.stride,
                                             org_module.padding, bias=False)
            self.lora_up = torch.nn.Conv2d(lora_dim, out_dim, (1, 1), (1, 1), bias=False)
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.lora_down = torch.nn.Linear(in_dim, lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(lora_dim, out_dim, bias=False)
        self.lora_dim = lora_dim
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.multiplier = multiplier
        self.org_module = [org_module]  # a list: not registered as a child, as kohya's `del self.org_module`

    def init_kohya(self, generator):
        # kohya: kaiming_uniform_(down, a=√5) (= U(±1/√fan_in)), zeros_(up).
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        torch.nn.init.zeros_(self.lora_up.weight)

    def apply_to(self):
        org = self.org_module[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self):
        self.org_module[0].forward = self.org_forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


class LoRANetwork(torch.nn.Module):
    """The UNet LoRA of kohya's LoRANetwork with network_dim/alpha and conv_dim/conv_alpha."""

    def __init__(self, model, network_dim, network_alpha, conv_dim=None, conv_alpha=None, multiplier=1.0,
                 modules_dim=None, modules_alpha=None):
        super().__init__()
        self.loras = torch.nn.ModuleList()
        conv = conv_dim is not None or modules_dim is not None
        for lora_name, path, module, is_conv3x3 in lora_targets(model, conv=conv):
            if modules_dim is not None:  # from weights: only the file's modules, at the file's ranks
                if lora_name not in modules_dim:
                    continue
                dim, alpha = modules_dim[lora_name], modules_alpha[lora_name]
            else:
                dim, alpha = (conv_dim, conv_alpha) if is_conv3x3 else (network_dim, network_alpha)
            lora = LoRAModule(lora_name, module, multiplier, dim, alpha)
            lora.diffusers_path = path
            self.loras.append(lora)

    def apply_to(self):
        for lora in self.loras:
            lora.apply_to()

    def restore(self):
        for lora in self.loras:
            lora.restore()

    def state_dict_kohya(self):
        """kohya's file layout: <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha (scalar)."""
        sd = {}
        for lora in self.loras:
            sd[f"{lora.lora_name}.lora_down.weight"] = lora.lora_down.weight.detach().clone().contiguous()
            sd[f"{lora.lora_name}.lora_up.weight"] = lora.lora_up.weight.detach().clone().contiguous()
            sd[f"{lora.lora_name}.alpha"] = lora.alpha.detach().clone()
        return sd

    def load_kohya(self, sd, source="LoRA"):
        """Load a kohya state dict; every tensor must be used and every module present (else exit)."""
        expected = set(self.state_dict_kohya())
        expected_opt = {k for k in expected if k.endswith(".alpha")}
        missing = sorted(expected - set(sd) - expected_opt)
        extra = sorted(set(sd) - expected)
        if missing or extra:
            raise SystemExit(f"{source}: does not fit the tiny UNet's kohya LoRA: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
        with torch.no_grad():
            for lora in self.loras:
                for part in ("lora_down", "lora_up"):
                    w = sd[f"{lora.lora_name}.{part}.weight"]
                    if w.shape != getattr(lora, part).weight.shape:
                        raise SystemExit(f"{source}: {lora.lora_name}.{part}.weight is {list(w.shape)}, the "
                                         f"module needs {list(getattr(lora, part).weight.shape)}")
                    getattr(lora, part).weight.copy_(w.float())
                alpha_key = f"{lora.lora_name}.alpha"
                a = float(sd[alpha_key]) if alpha_key in sd else float(lora.lora_dim)  # kohya: no alpha → rank
                lora.alpha.fill_(a)
                lora.scale = a / lora.lora_dim

    def named_lora_parameters(self):
        """(kohya tensor name, parameter) for the trainable tensors: down and up weights."""
        for lora in self.loras:
            yield f"{lora.lora_name}.lora_down.weight", lora.lora_down.weight
            yield f"{lora.lora_name}.lora_up.weight", lora.lora_up.weight


def network_from_kohya(model, sd, source="LoRA"):
    """A LoRANetwork shaped after a kohya state dict, as kohya's create_network_from_weights: each module's
    rank from its lora_down, its alpha from <name>.alpha (absent → rank), only the modules in the file."""
    modules_dim, modules_alpha = {}, {}
    for k, v in sd.items():
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            modules_dim[name] = v.shape[0]
            modules_alpha[name] = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else float(v.shape[0])
    net = LoRANetwork(model, None, None, modules_dim=modules_dim, modules_alpha=modules_alpha)
    net.load_kohya(sd, source)
    return net


def unet_forward(model, x, timesteps, context, y):
    """The UNet on the LDM label vector y (make_unet.forward_with_emb): emb = time_embedding(
    time_proj(t)) + add_embedding(y) — what lora-dist's UNet takes (x, timesteps, context, y)."""
    t_emb = model.time_proj(timesteps).to(x.dtype)
    emb = model.time_embedding(t_emb) + model.add_embedding(y)
    return make_unet.forward_with_emb(model, x, emb, context)


def tiny_config_json():
    with safe_open(UNET_TINY, "pt") as f:
        return f.metadata()["config"]


if __name__ == "__main__":
    # Self-check of the target enumeration on the real SDXL topology (meta device, no weights): kohya
    # makes 722 Linear modules for SDXL's UNet (the count in issue 6), and every name must be an LDM
    # module of the real model (Tests/Fixtures/sdxl/unet_sdxl_shapes.json).
    with torch.device("meta"):
        big = make_unet.build_model(model_channels=320, norm_groups=32, head_dim=64, depth=(1, 2, 10),
                                    context_dim=2048, time_id_dim=256, adm_in=2816)
    with open(os.path.join(SDXL_FIXTURES, "unet_sdxl_shapes.json")) as f:
        shapes = json.load(f)
    lin = lora_targets(big, conv=False)
    allt = lora_targets(big, conv=True)
    ldm_modules = {"lora_unet_" + k[len(LDM_PREFIX):-len(".weight")].replace(".", "_") for k in shapes
                   if k.endswith(".weight")}
    assert all(n in ldm_modules for n, _, _, _ in allt)
    print(f"SDXL: {len(lin)} linear targets, {len(allt)} with conv_dim "
          f"({sum(c for *_, c in allt)} 3x3 convs)")
    assert len(lin) == 722, len(lin)
