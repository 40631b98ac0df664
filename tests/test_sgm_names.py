"""The original Stable Diffusion UNet's module names for a diffusers UNet (how sd-scripts names
SDXL LoRA modules), checked against names that real SD 1.x / SDXL checkpoints carry."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

from deltacodec.layouts.sgm_names import sgm_name, unet_structure  # noqa: E402


def _unet(down, up, layers):
    # channels tiny: only the module tree matters here
    return UNet2DConditionModel(
        block_out_channels=(4, 8, 8)[: len(down)], layers_per_block=layers, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=down, up_block_types=up, cross_attention_dim=8, norm_num_groups=2,
        attention_head_dim=2,
    )


SDXL = (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), 2)
SD15_LIKE = (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), 2)

# (diffusers name, original name): keys every SDXL / SD 1.x checkpoint holds (model.diffusion_model.*)
SDXL_KNOWN = [
    ("conv_in", "input_blocks.0.0"),
    ("down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
    ("mid_block.resnets.0.time_emb_proj", "middle_block.0.emb_layers.1"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", "middle_block.1.transformer_blocks.0.ff.net.2"),
    ("mid_block.resnets.1.norm1", "middle_block.2.in_layers.0"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "output_blocks.0.1.transformer_blocks.0.attn2.to_k"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("conv_out", "out.2"),
]
SD15_KNOWN = [
    ("down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in"),
    ("down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v", "input_blocks.5.1.transformer_blocks.0.attn1.to_v"),
    ("down_blocks.2.resnets.1.conv1", "input_blocks.8.0.in_layers.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0", "output_blocks.6.1.transformer_blocks.0.attn1.to_out.0"),
]


@pytest.mark.parametrize("arch,known", [(SDXL, SDXL_KNOWN), (SD15_LIKE, SD15_KNOWN)], ids=["sdxl", "sd15"])
def test_known_checkpoint_names_and_no_two_modules_share_one(arch, known):
    unet = _unet(*arch)
    structure = unet_structure(unet)
    assert structure is not None
    names = dict(unet.named_modules())
    for ours, original in known:
        assert ours in names, ours
        assert sgm_name(ours, *structure) == original, ours
    mapped = {}
    for n in names:
        s = sgm_name(n, *structure) if n else None
        if s is not None:
            assert s not in mapped, (n, mapped.get(s))
            mapped[s] = n
    # every leaf layer inside the blocks has a name there (nothing a LoRA targets is left out)
    leaves = [n for n, m in unet.named_modules() if not list(m.children()) and n.split(".")[0] in
              ("down_blocks", "mid_block", "up_blocks") and not n.endswith(("dropout", "nonlinearity", ".act"))]
    missing = [n for n in leaves if sgm_name(n, *structure) is None and "dropout" not in n and ".net.1" not in n]
    assert missing == []


def test_not_a_unet_has_no_structure_and_unknown_names_map_to_nothing():
    assert unet_structure(object()) is None
    assert sgm_name("down_blocks.9.attentions.0", [2, 2], [True, False]) is None
    assert sgm_name("down_blocks.1.downsamplers.0.conv", [2, 2], [True, False]) is None  # last block: none
    assert sgm_name("down_blocks.0.resnets.0.weird", [2, 2], [True, False]) is None
    assert sgm_name("add_embedding.linear_2", [2], [False]) == "label_emb.0.2"
