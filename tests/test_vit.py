"""The Vision Transformer: config checks, patch embedding and pooling by brute force, bad pixel inputs,
and parity with transformers' ViT (tiny random-init checkpoints, both directions)."""

from __future__ import annotations

import os

import pytest
import torch

import formerkit as fk
from conftest import PARITY_TOL, parity_error, reinit_for_parity, require
from formerkit.checkpoints import tied_names
from formerkit.checkpoints.hf import sources_from_hf, state_to_hf
from formerkit.checkpoints.hf_families import FAMILIES
from formerkit.checkpoints.hf_maps import VIT, expand
from formerkit.checkpoints.loading import build_tensor
from formerkit.heads import pool
from formerkit.layers.feedforward import ACTIVATIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(**kw) -> fk.Transformer:
    torch.manual_seed(0)
    values = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, image_size=8, patch_size=2, num_channels=3,
                  max_seq_len=17, num_labels=5)
    return fk.Transformer(fk.ModelConfig.from_preset("vit-digits", **{**values, **kw})).eval()


def _pixels(cfg: fk.ModelConfig, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)


# ---- config -----------------------------------------------------------------------------------------------
def test_vit_preset_is_vit_b16():
    cfg = fk.ModelConfig.from_preset("vit")
    assert (cfg.image_size, cfg.patch_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (224, 16, 768, 12,
                                                                                                  12, 3072)
    assert (cfg.activation, cfg.norm_eps, cfg.norm_placement, cfg.qkv_bias) == ("gelu", 1e-12, "pre", True)
    assert cfg.num_patches == 196 and cfg.num_image_tokens == 197 == cfg.max_seq_len
    with torch.device("meta"):
        assert fk.Transformer(cfg).num_parameters() == 86_567_656  # ViT-B/16 with a 1000-class head


@pytest.mark.parametrize("kw, fragment", [
    ({"image_size": 9}, "not divisible by patch_size=2"),
    ({"patch_size": None}, "image_size=8 is set but patch_size is not"),
    ({"image_size": None}, "needs image_size"),
    ({"patch_size": 0}, "patch_size must be a positive integer"),
    ({"num_channels": 0}, "num_channels must be a positive integer"),
    ({"kind": "decoder", "head": "classifier"}, "kind='encoder'"),
    ({"head": "mlm"}, "head='classifier' or 'none'"),
    ({"pooling": "last"}, "pools with 'cls'"),
    ({"max_seq_len": 16}, "set max_seq_len=17"),
    ({"type_vocab_size": 2}, "no token types"),
])
def test_bad_image_configs_name_the_field(kw, fragment):
    with pytest.raises(fk.ConfigError, match=fragment):
        fk.ModelConfig.from_preset("vit-digits", **kw)


# ---- the pieces, by brute force -----------------------------------------------------------------------------
def test_patch_embedding_equals_unfold_and_matmul():
    model = _tiny(pooling="mean", max_seq_len=16)
    cfg, proj = model.config, model.patch_embed.proj
    x = _pixels(cfg)
    p = cfg.patch_size
    patches = torch.nn.functional.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C*p*p), row by row
    expected = patches @ proj.weight.reshape(cfg.d_model, -1).T + proj.bias  # (B, N, d_model)
    # the same by hand: patch (r, c) is x[:, :, r*p:(r+1)*p, c*p:(c+1)*p]
    side = cfg.image_size // p
    by_hand = torch.stack([x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].flatten(1)
                           for r in range(side) for c in range(side)], dim=1)
    assert torch.allclose(patches, by_hand)
    with torch.no_grad():
        got = model.patch_embed(x)
    assert got.shape == (3, cfg.num_patches, cfg.d_model)
    assert (got - expected).abs().max() < 1e-5


def test_cls_token_is_prepended_and_positions_are_added():
    model = _tiny()
    x = _pixels(model.config)
    seen = {}
    model.hook_embed.register_forward_hook(lambda mod, args, out: seen.setdefault("embed", out))
    model.hook_pos_embed.register_forward_hook(lambda mod, args, out: seen.setdefault("pos", out))
    with torch.no_grad():
        model(pixel_values=x)
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    assert seen["embed"].shape == (3, 17, 32)
    assert torch.equal(seen["embed"][:, 0], model.patch_embed.cls_token[0].expand(3, -1).detach())
    assert torch.allclose(seen["embed"][:, 1:], patches)
    assert torch.equal(seen["pos"][0], model.pos_embed.weight[:17].detach())


def test_mean_pooling_averages_the_patch_tokens():
    model = _tiny(pooling="mean", max_seq_len=16)
    assert model.patch_embed.cls_token is None
    x = _pixels(model.config)
    with torch.no_grad():
        out = model(pixel_values=x)
    assert out.hidden_states.shape == (3, 16, 32)  # no CLS token
    pooled = out.hidden_states.mean(dim=1)
    expected = pooled @ model.classifier.out.weight.T + model.classifier.out.bias
    assert (out.logits - expected).abs().max() < 1e-5
    assert torch.allclose(pool(out.hidden_states, None, "mean"), pooled, atol=1e-6)


def test_logits_depend_on_every_patch_and_labels_give_a_loss():
    model = _tiny()
    x = _pixels(model.config).requires_grad_(True)
    out = model(pixel_values=x, labels=torch.tensor([0, 4, 2]))
    out.loss.backward()
    assert out.loss.item() > 0 and (x.grad.abs().sum(dim=(0, 1)) > 0).all()  # every pixel matters


def test_hook_names_are_the_usual_ones():
    names = {name for name, _ in _tiny().named_modules()}
    for name in ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern",
                 "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]:
        assert name in names


# ---- bad inputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, fragment", [
    (lambda: torch.randn(2, 3, 16, 16), "images are 16x16, but the model expects 8x8"),
    (lambda: torch.randn(2, 1, 8, 8), "has 1 channels, but the model expects num_channels=3"),
    (lambda: torch.randn(2, 8, 8, 3), "channels-last"),
    (lambda: torch.randn(3, 8, 8), "unsqueeze"),
    (lambda: torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "floating point"),
    (lambda: torch.zeros(0, 3, 8, 8), "empty"),
    (lambda: [[0.0]], "torch.Tensor"),
])
def test_bad_pixel_values_name_expected_and_got(make, fragment):
    with pytest.raises(fk.InputError, match=fragment):
        _tiny()(pixel_values=make())


def test_image_and_text_inputs_are_not_mixed():
    model = _tiny()
    with pytest.raises(fk.InputError, match="pass the images as pixel_values="):
        model(_pixels(model.config))
    with pytest.raises(fk.InputError, match="needs pixel_values"):
        model()
    with pytest.raises(fk.InputError, match="attention_mask"):
        model(attention_mask=torch.ones(3, 17), pixel_values=_pixels(model.config))
    with pytest.raises(fk.InputError, match="head='none'"):
        _tiny(head="none")(pixel_values=_pixels(model.config), labels=torch.tensor([0, 1, 2]))
    text = fk.Transformer(fk.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=20))
    with pytest.raises(fk.InputError, match="text model"):
        text(torch.zeros(1, 3, dtype=torch.long), pixel_values=torch.zeros(1, 3, 8, 8))


# ---- checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"qkv_bias": False}, {"head": "none", "pooler": True}])
def test_vit_name_table_round_trips_both_ways(kw):
    model = _tiny(**kw)
    tied = tied_names(model)
    state = model.state_dict()
    hf_config, hf_state = state_to_hf(model.config, state, tied)
    assert hf_config["model_type"] == "vit"
    assert hf_state[("vit." if model.config.head != "none" else "") + "embeddings.position_embeddings"].shape \
        == (1, 17, 32)
    sources = sources_from_hf(model.config, FAMILIES["vit"], hf_state, state, tied)
    assert sources.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(build_tensor(sources[name], hf_state), tensor), name
    rules = expand(VIT, 2)
    assert len({r[0] for r in rules}) == len(rules)
    assert len({n for r in rules for n in r[1]}) == sum(len(r[1]) for r in rules)


def test_native_round_trip(tmp_path):
    model = _tiny(pooling="mean", max_seq_len=16)
    fk.save_pretrained(model, tmp_path)
    loaded = fk.from_pretrained(tmp_path)
    x = _pixels(model.config)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)


def test_configs_hf_cannot_hold_are_refused(tmp_path):
    for kw in [{"pooling": "mean", "max_seq_len": 16}, {"max_seq_len": 40}, {"norm_placement": "post"},
               {"head": "none", "pooler": False}]:
        with pytest.raises(fk.ConfigError, match="format='native'"):
            fk.save_pretrained(_tiny(**kw), tmp_path, format="hf")


@pytest.mark.parametrize("hf, fragment", [
    ({"model_type": "vit", "architectures": ["ViTForMaskedImageModeling"]}, "not supported"),
    ({"model_type": "vit", "image_size": [224, 160]}, "not square"),
    ({"model_type": "vit", "image_size": 30, "patch_size": 16}, "divisible"),
])
def test_from_hf_rejects_what_it_cannot_express(hf, fragment):
    with pytest.raises(fk.ConfigError, match=fragment):
        fk.config_from_hf(hf)


class TestParity:
    """formerkit and transformers agree on the same weights, read in either direction.

    The weights are re-initialised with ``reinit_for_parity`` (std 0.3) so that the comparison can
    fail; ``test_a_swapped_activation_fails_the_parity_check`` shows that it does.
    """

    @pytest.fixture(autouse=True)
    def _transformers(self):
        self.transformers = require("transformers")
        self.transformers.logging.set_verbosity_error()

    def _reference(self, cls, **kw):
        torch.manual_seed(0)
        cfg = self.transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=48, image_size=8, patch_size=2, num_channels=3, **kw)
        return reinit_for_parity(cls(cfg)).eval()

    def _errors(self, reference, ours, x) -> list[float]:
        """parity_error of formerkit's outputs (hidden states and pooled, or logits) against the reference's."""
        with torch.no_grad():
            ref = reference(pixel_values=x, output_hidden_states=True)
            out = ours(pixel_values=x)
        if hasattr(ref, "last_hidden_state"):
            return [parity_error(out.hidden_states, ref.last_hidden_state), parity_error(out.pooled, ref.pooler_output)]
        assert ref.logits.abs().max() > 1.0  # the comparison is not between two near-zeros
        return [parity_error(out.logits, ref.logits)]

    @pytest.mark.parametrize("kw", [{"num_labels": 5}, {"num_labels": 3, "qkv_bias": False, "hidden_act": "relu",
                                                         "layer_norm_eps": 1e-6}])
    def test_classifier_loads_from_transformers(self, kw, tmp_path):
        reference = self._reference(self.transformers.ViTForImageClassification, **kw)
        reference.save_pretrained(tmp_path)
        ours = fk.from_pretrained(tmp_path)
        assert ours.config.patch_size == 2 and ours.config.num_labels == kw["num_labels"]
        assert max(self._errors(reference, ours, _pixels(ours.config, batch=4))) < PARITY_TOL

    def test_base_model_with_pooler_loads_from_transformers(self, tmp_path):
        reference = self._reference(self.transformers.ViTModel)
        reference.save_pretrained(tmp_path)
        ours = fk.from_pretrained(tmp_path)
        assert ours.config.head == "none" and ours.config.pooler
        assert max(self._errors(reference, ours, _pixels(ours.config, batch=2))) < PARITY_TOL

    def test_a_swapped_activation_fails_the_parity_check(self, tmp_path, monkeypatch):
        """The mutant check: formerkit with the tanh approximation for ViT's exact GELU fails the comparison."""
        reference = self._reference(self.transformers.ViTForImageClassification, num_labels=5)
        reference.save_pretrained(tmp_path)
        monkeypatch.setitem(ACTIVATIONS, "gelu", ACTIVATIONS["gelu_tanh"])
        mutant = fk.from_pretrained(tmp_path)
        assert min(self._errors(reference, mutant, _pixels(mutant.config, batch=4))) > 3 * PARITY_TOL

    @pytest.mark.parametrize("head", ["classifier", "none"])
    def test_formerkit_model_loads_in_transformers(self, head, tmp_path):
        ours = reinit_for_parity(_tiny(head=head, pooler=head == "none", num_labels=5 if head == "classifier" else 2))
        fk.save_pretrained(ours, tmp_path, format="hf")
        cls = self.transformers.ViTForImageClassification if head == "classifier" else self.transformers.ViTModel
        reference = cls.from_pretrained(tmp_path).eval()
        assert max(self._errors(reference, ours, _pixels(ours.config, seed=1))) < PARITY_TOL
        assert fk.from_pretrained(tmp_path).config == ours.config.replace(vocab_size=1)
