"""Per-forward state: concurrent forwards through one patched model, direct block calls, activation-checkpointing
replays, and a patched model that survives copies, pickles, state dicts, dtype changes and compilation."""

from __future__ import annotations

import copy
import io
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm.models._manipulate
import torch

import mame
from mame.baselines import tome
from test_patch_timm import images, layerscale_vit, make_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def patched(method: str = "mame", **options):
    """A DINOv2-like tiny ViT (registers, LayerScale) with ragged per-sample merging in every block."""
    model = layerscale_vit()
    if method == "tome":
        return tome.patch_timm(model, r=options.pop("r", 3), **options)
    return mame.patch.timm(model, **{"tau": 0.2, "layers": 3, **options})


def varied_inputs(count: int = 12) -> list[torch.Tensor]:
    """Inputs of different batch sizes and contents, so concurrent forwards have different token counts."""
    return [images(batch=1 + i % 3, seed=i) for i in range(count)]


@pytest.mark.parametrize("method", ["mame", "tome"])
def test_concurrent_forwards_give_each_caller_its_sequential_result(method):
    model = patched(method)
    inputs = varied_inputs()
    with torch.no_grad():
        expected = []
        for x in inputs:
            expected.append((model(x), model.mame.last_token_counts, model.mame.unmerge(model.forward_features(x))
                             if method == "mame" else None))
    if method == "mame":  # ToMe merges r per block whatever the input; its forwards differ in batch size
        assert len({tuple(counts) for _, counts, _ in expected}) > 3  # the forwards really differ

    def serve(index: int):
        x = inputs[index % len(inputs)]
        with torch.no_grad():
            out = model(x)
            counts = model.mame.last_token_counts  # this thread's own last forward
            dense = model.mame.unmerge(model.forward_features(x)) if method == "mame" else None
        return index % len(inputs), out, counts, dense

    order = list(range(5 * len(inputs)))  # 60 requests on 8 threads: torch releases the GIL, so forwards interleave
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(serve, order))
    for index, out, counts, dense in results:
        ref_out, ref_counts, ref_dense = expected[index]
        assert torch.equal(out, ref_out)
        assert counts == ref_counts
        if dense is not None:
            assert torch.equal(dense, ref_dense)


def test_last_forward_is_kept_per_thread():
    model = patched()
    small, large = images(batch=1, seed=3), images(batch=3, seed=4)
    with torch.no_grad():
        model(small)
        mine = model.mame.last_token_counts
        other = ThreadPoolExecutor(1).submit(lambda: (model(large), model.mame.last_token_counts)).result()[1]
        assert other != mine
        assert model.mame.last_token_counts == mine  # the other thread's forward did not replace ours
        assert model.mame.last_plans[0].sizes_in.shape[0] == 1


def test_direct_block_call_after_a_forward_starts_clean():
    model = patched()
    fresh = patched()  # same weights and settings, never ran a forward
    tokens = torch.randn(5, 21, 64, generator=torch.Generator().manual_seed(9))  # another batch size than below
    with torch.no_grad():
        model(images(batch=2))
        for index in (1, 2):
            torch.testing.assert_close(model.blocks[index](tokens), fresh.blocks[index](tokens), atol=0, rtol=0)
            assert model.mame.state.sizes.shape[0] == 5  # this call's own state, not the forward's


def test_hand_written_loop_over_blocks_equals_the_model_forward():
    """A loop over the blocks outside a model forward carries each block's sizes and padding to the next."""
    model = patched()
    x = images(batch=3)
    with torch.no_grad():
        expected = model.forward_features(x)
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks:
            t = block(t)
        assert model.mame.state.mask is not None  # the ragged case
        torch.testing.assert_close(model.norm(t), expected, atol=0, rtol=0)


def grads_of(model, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method, batch_rule", [("mame", "per_sample"), ("mame", "any"), ("tome", None)])
def test_checkpointed_replay_gives_the_same_output_and_gradients(method, batch_rule, reentrant, monkeypatch):
    options = {} if method == "tome" else {"batch_rule": batch_rule, "tau": 0.2 if batch_rule == "per_sample" else -0.5}
    model = patched(method, **options).train()
    x = images(batch=3)
    out, grads = grads_of(model, x)
    monkeypatch.setattr(timm.models._manipulate, "use_reentrant_ckpt", lambda: reentrant)
    model.set_grad_checkpointing(True)
    replayed_out, replayed_grads = grads_of(model, x)
    assert model.mame.last_token_counts[-1] < 21  # it merged
    torch.testing.assert_close(replayed_out, out, atol=1e-6, rtol=1e-6)
    assert_same_gradients(replayed_grads, grads)


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 summation order: each parameter's gradient within 1e-5 of its own norm."""
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert (got[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-7, name


def test_replay_of_two_blocks_per_checkpoint_segment():
    """timm's checkpoint_seq with every=2: the second block of a segment is replayed on a tensor made during the
    replay, and must continue from the first block's exit state."""
    model = patched().train()
    x = images(batch=3)
    out, grads = grads_of(model, x)

    def forward_in_segments(x):
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        t = timm.models._manipulate.checkpoint_seq(model.blocks, t, every=2, use_reentrant=False)
        return model.forward_head(model.norm(t))

    model.zero_grad()
    replayed = forward_in_segments(x)
    (replayed * torch.linspace(-1, 1, replayed.shape[-1])).sum().backward()
    torch.testing.assert_close(replayed.detach(), out, atol=1e-6, rtol=1e-6)
    assert_same_gradients({name: p.grad for name, p in model.named_parameters() if p.grad is not None}, grads)


def test_torch_save_and_load_of_a_patched_model():
    model = patched()
    x = images(batch=2)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a whole module needs weights_only=False, as for any model
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert loaded.mame.last_token_counts == model.mame.last_token_counts
    assert loaded.mame is not model.mame and loaded.blocks[0]._mame_runtime is loaded.mame
    mame.unpatch(loaded)
    assert type(loaded) is timm.models.vision_transformer.VisionTransformer


def test_state_dict_round_trips_into_the_unpatched_model():
    model = patched()
    plain = layerscale_vit()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # trained after patching
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    x = images()
    with torch.no_grad():
        mame.unpatch(model)
        assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-5), (torch.bfloat16, 0.5)])
def test_to_dtype(dtype, atol):
    model = patched(tau=0.5)
    x = images(batch=2)
    with torch.no_grad():
        expected = model(x)
        counts = model.mame.last_token_counts
        converted = model.to(dtype)
        out = converted(x.to(dtype))
    assert out.dtype == dtype
    if dtype == torch.float64:  # the same merges, more exactly
        assert converted.mame.last_token_counts == counts
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)


# The partition cache is keyed by plain Python values, so tracing through it is exact; dynamo warns regardless.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_runs_and_matches():
    """torch.compile traces the patched forward; the merges' data-dependent lengths break the graph there, so the
    blocks compile in pieces around them. The eager backend keeps this test fast; see the README for inductor."""
    model = patched()
    x = images(batch=2)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(compiled(images(batch=3, seed=5)), model(images(batch=3, seed=5)),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", ["deit", "dinov2_reg", "avg_no_cls"])
def test_forward_intermediates_are_unmerged_to_the_patch_grid(config):
    model = make_vit(config, depth=4)
    reference = copy.deepcopy(model)
    x = images(batch=3)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        mame.patch.timm(model, tau=0.2, layers=[2, 3])
        before = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        for got, want in zip(before, expected):  # before the first merge: the unpatched intermediates
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

        final, maps = model.forward_intermediates(x, indices=[1, 3], norm=True)
        torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)  # merged, as forward_features
        dense = model.mame.unmerge(final)[:, model.num_prefix_tokens:]
        assert model.mame.state.mask is not None  # ragged: padding had to be dropped on the way back
        assert [tuple(m.shape) for m in maps] == [(3, 64, 4, 4)] * 2
        torch.testing.assert_close(maps[1], dense.transpose(1, 2).reshape(3, 64, 4, 4), atol=1e-6, rtol=0)

        nlc = model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True, norm=True)
        if model.num_prefix_tokens:
            (patches, prefix), = nlc
            torch.testing.assert_close(prefix, final[:, : model.num_prefix_tokens], atol=1e-6, rtol=0)
        else:
            (patches,) = nlc
        torch.testing.assert_close(patches, dense, atol=1e-6, rtol=0)
        as_dict = model.forward_intermediates(x, indices=[3], norm=True, output_dict=True)
        torch.testing.assert_close(as_dict["image_intermediates"][0], maps[1], atol=0, rtol=0)


def test_forward_intermediates_after_a_merge_need_fusion_plans():
    x = images()
    for model in (mame.patch.timm(make_vit("deit"), tau=0.2, layers=3).train(),
                  tome.patch_timm(make_vit("deit"), r=2)):
        with pytest.raises(ValueError, match="needs fusion plans"):
            model.forward_intermediates(x, indices=[1])


def test_torch_export_is_refused_by_the_data_dependent_token_count():
    """Documented limit: how many tokens a merge keeps depends on the data, which torch.export cannot trace into
    one static graph (it raises rather than baking one input's counts in). If this starts passing, update the
    README's "Serving" section."""
    model = patched(batch_rule="any")
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(model, (images(batch=1),))


def test_unmerge_refuses_what_it_cannot_map_back():
    x = images()
    model = tome.patch_timm(make_vit("deit"), r=2)
    with torch.no_grad():
        features = model.forward_features(x)
    with pytest.raises(RuntimeError, match="kept no fusion plans"):
        model.mame.unmerge(features)
    model = mame.patch.timm(make_vit("deit"), tau=0.2, layers=3)
    with torch.no_grad():
        features = model.forward_features(x)
    with pytest.raises(ValueError, match="features must be"):
        model.mame.unmerge(features[:1])
