"""The official recipes on tiny real models: trained modules, rollout states, teacher prompts, captions.

Every expected value below is written down from the official D-OPSD scripts (github.com/vvvvvjdy/D-OPSD,
commit b9dfa2d) or from diffusers' module names, never computed by the code under test:
- Z-Image targets: z-image-turbo_self-distill-vlm/train_dopsd.py L236-244, PEFT suffix matching;
- klein targets: flux2-klein_self-distill-edit/train_dopsd.py L375-388 on diffusers' Flux2 names
  (transformer_flux2.py: Flux2Attention to_q/k/v, to_out.0, add_*_proj, to_add_out; Flux2FeedForward
  linear_in/out; Flux2ParallelSelfAttention to_qkv_mlp_proj, to_out);
- states: Z-Image L483-484 (t = 0, 100, 250, 500 of 1000); klein L621-629 at 1024^2 (the issue's numbers);
- klein teacher prompt: L640 f"{caption} {edit_sys_prompt}", the instruction from scripts/train_lora_4b.sh L34.
"""
import json
import logging

import pytest
import torch

import comfy_fixtures as F
from nodes_support import TRAINER_DEFAULTS, encode, executor_mode, images, klein_clip, wait_state

ZIMAGE_OFFICIAL_TARGETS = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention.to_k",
                           "attention.to_q", "attention.to_v", "attention.to_out.0"]
KLEIN_OFFICIAL_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                          "attn.to_q", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2",
                          "ff_context.net.0.proj", "ff_context.net.2"]
KLEIN_INSTRUCTION = ("Make the main subject (facial/ip details), background, and overall composition consistent "
                     "with the reference image.")
ZIMAGE_STATES = [1.0, 0.9, 0.75, 0.5]                  # 1 - t/1000 for t = 0, 100, 250, 500
KLEIN_OFFICIAL_STATES_1024 = [1.0, 0.952, 0.832, 0.0098]
KLEIN_PACK_STATES_1024 = [1.0, 0.967, 0.908, 0.767]


def peft_matches(name, targets):
    """PEFT's rule for a list of target names: the module name equals one or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def flux2_diffusers_to_comfy(depth, depth_single):
    """diffusers Flux2Transformer2DModel Linear names -> the ComfyUI Flux2 module (and q/k/v row block) they are."""
    out = {}
    for i in range(depth):
        d, c = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for part, name in (("to_q", 0), ("to_k", 1), ("to_v", 2)):
            out[d + "attn." + part] = c + "img_attn.qkv"
        for part in ("add_q_proj", "add_k_proj", "add_v_proj"):
            out[d + "attn." + part] = c + "txt_attn.qkv"
        out[d + "attn.to_out.0"] = c + "img_attn.proj"
        out[d + "attn.to_add_out"] = c + "txt_attn.proj"
        out[d + "ff.linear_in"], out[d + "ff.linear_out"] = c + "img_mlp.0", c + "img_mlp.2"
        out[d + "ff_context.linear_in"], out[d + "ff_context.linear_out"] = c + "txt_mlp.0", c + "txt_mlp.2"
    for i in range(depth_single):
        out[f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"] = f"single_blocks.{i}.linear1"
        out[f"single_transformer_blocks.{i}.attn.to_out"] = f"single_blocks.{i}.linear2"
    return out


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, recipe_bridge, teacher_nodes, trainer_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def R(pack):
    from comfyui_dopsd.dopsd_core import recipes
    return recipes


@pytest.fixture(scope="module")
def zimage():
    with executor_mode():
        return F.build_tiny_zimage(seed=0)


@pytest.fixture(scope="module")
def flux2():
    with executor_mode():
        return F.build_tiny_flux2(seed=0), F.build_tiny_flux2_vae(seed=0)


def settings_for(N, R, name, model):
    given = {k: v for k, v in TRAINER_DEFAULTS.items() if k not in ("seed", "save_prefix", "save_every",
                                                                     "preview_every")}
    given.update(N.recipe_bridge.option_values({}))
    return N.recipe_bridge.resolve(name, given, model, [])[0]


# -- trained modules ---------------------------------------------------------------------------------------

def test_zimage_recipe_trains_the_official_modules_as_separate_q_k_v(N, R, zimage):
    import comfy.lora
    import comfy.utils
    cfg = zimage.model.model_config.unet_config
    # the host's own diffusers -> ComfyUI map: which ComfyUI weights (and rows) the official names are
    to_comfy = comfy.utils.z_image_to_diffusers(cfg, output_prefix="diffusion_model.")
    official = {k: to_comfy[k] for k in to_comfy
                if k.endswith(".weight") and peft_matches(k[:-len(".weight")], ZIMAGE_OFFICIAL_TARGETS)}
    assert len(official) == 7 * (cfg["n_layers"] + 2 * cfg["n_refiner_layers"])
    net = N.recipe_bridge.build_network(zimage, settings_for(N, R, R.ZIMAGE, zimage), seed=0)
    sd = net.comfy_state_dict()
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(zimage.model, {}))
    # every official module and nothing else: the weights ComfyUI's loader patches with the saved file
    assert set(patches) == set(official.values())  # q/k/v keys: (fused weight, (dim, row offset, rows))
    # q, k and v are saved under their diffusers names, each its own rank-64 LoRA on its rows of the fused qkv
    qkv_names = {k[:-len(".weight")] for k, t in official.items() if isinstance(t, tuple)}
    assert {k.rsplit(".lora_", 1)[0] for k in sd if ".attention.to_" in k and ".lora_up." in k} == \
        {"diffusion_model." + k.split("diffusion_model.")[-1] for k in qkv_names}
    assert all(sd[k].shape[1] == 64 for k in sd if ".attention.to_q.lora_up" in k)
    for name, m in net.items():
        assert m.rank == 64 and m.alpha == 128.0
        if name.endswith("attention.qkv"):
            assert m.parts == ("to_q", "to_k", "to_v") and m.down.shape[0] == 3 * 64  # three rank-64 LoRAs
    # the pack's choice is an option: one LoRA over ComfyUI's fused qkv
    pack = N.recipe_bridge.build_network(zimage, settings_for(N, R, R.CUSTOM, zimage), seed=0)
    assert {n for n in pack.names if n.endswith("qkv")} == {n for n in net.names if n.endswith("qkv")}
    assert all(not m.parts for m in pack.loras)


def test_klein_recipe_trains_only_the_double_stream_attention(N, R, flux2):
    model, _ = flux2
    cfg = model.model.model_config.unet_config
    names = flux2_diffusers_to_comfy(cfg["depth"], cfg["depth_single_blocks"])
    official = {names[d] for d in names if peft_matches(d, KLEIN_OFFICIAL_TARGETS)}
    net = N.recipe_bridge.build_network(model, settings_for(N, R, R.KLEIN, model), seed=0)
    assert set(net.names) == official
    assert all("double_blocks" in n and "_attn." in n for n in net.names)
    saved = {k.rsplit(".lora_", 1)[0] for k in net.comfy_state_dict() if ".lora_up." in k}
    # q/k/v as separate LoRAs under diffusers' names, which ComfyUI's loader maps onto the fused rows
    assert {k for k in saved if k.startswith("transformer.")} == {
        f"transformer.transformer_blocks.{i}.attn.{p}" for i in range(cfg["depth"])
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    # the pack's choice (an option: targets "auto") also trains the MLPs and the single-stream blocks
    pack = N.recipe_bridge.build_network(model, settings_for(N, R, R.CUSTOM, model), seed=0)
    assert official < set(pack.names) and any(n.startswith("single_blocks") for n in pack.names)


def test_gaussian_init_has_std_one_over_rank(pack):
    from comfyui_dopsd.dopsd_core.lora import LoRAModule
    m = LoRAModule(4096, 64, rank=16, alpha=16, init="gaussian", generator=torch.Generator().manual_seed(0))
    assert abs(float(m.down.detach().std()) - 1 / 16) < 0.002 and not m.up.any()
    k = LoRAModule(4096, 64, rank=16, alpha=16, init="default", generator=torch.Generator().manual_seed(0))
    assert float(k.down.detach().abs().max()) <= 1 / 4096 ** 0.5 and abs(float(k.down.detach().std()) - 1 / (3 * 4096) ** 0.5) < 1e-3


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_separate_qkv_lora_loads_in_comfyui_and_gives_the_trained_output(N, R, zimage, flux2, family, caplog):
    """ComfyUI's own loader maps the saved to_q/to_k/to_v keys onto the fused qkv: same output as training."""
    import comfy.lora
    model = zimage if family == "zimage" else flux2[0]
    recipe = R.ZIMAGE if family == "zimage" else R.KLEIN
    net = N.recipe_bridge.build_network(model, dict(settings_for(N, R, recipe, model), rank=4, alpha=8.0), seed=1)
    assert any(m.parts for m in net.loras)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.loras:
            m.up.copy_(torch.randn(m.up.shape, generator=gen) * 0.05)  # the mask keeps the blocks apart
    sd = net.comfy_state_dict()
    if family == "zimage":
        x, extra = torch.randn(1, 16, 8, 8, generator=gen), {"num_tokens": 5}
        ctx = torch.randn(1, 5, F.ZIMAGE_TE_HIDDEN, generator=gen)
    else:
        x, extra = torch.randn(1, 128, 4, 4, generator=gen), {}
        ctx = torch.randn(1, 5, F.TINY_FLUX2["context_in_dim"], generator=gen)
        assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_up.weight" in sd
    sigma = torch.tensor([0.7])
    with torch.no_grad(), executor_mode():
        base = model.model.apply_model(x, sigma, c_crossattn=ctx, **extra)
        handle = net.attach(model.model.diffusion_model)
        try:
            with net.mode("student"):
                trained = model.model.apply_model(x, sigma, c_crossattn=ctx, **extra)
        finally:
            handle.remove()
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(sd, key_map)
        assert "lora key not loaded" not in caplog.text
        assert {k[0] if isinstance(k, tuple) else k for k in patches} == {f"diffusion_model.{n}.weight"
                                                                          for n in net.names}
        patched = model.clone()
        patched.add_patches(patches, 1.0)
        patched.patch_model()
        try:
            loaded = patched.model.apply_model(x, sigma, c_crossattn=ctx, **extra)
        finally:
            patched.unpatch_model()
    assert not torch.allclose(trained, base, atol=1e-4)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    # and back: the file loads into a fresh network of the same layout
    again = N.recipe_bridge.build_network(model, dict(settings_for(N, R, recipe, model), rank=4, alpha=8.0), seed=9)
    again.load_comfy_state_dict(sd)
    for a, b in zip(net.loras, again.loras):
        assert all(torch.equal(x, y) for x, y in zip(a.factors("student"), b.factors("student")))


# -- rollout states ----------------------------------------------------------------------------------------

def test_rollout_states_of_both_recipes_through_the_host_schedules(N, R, zimage, flux2):
    model, _ = flux2
    infer = N.trainer_nodes.inference_sigmas
    z = N.recipe_bridge.rollout_states(zimage, settings_for(N, R, R.ZIMAGE, zimage), torch.zeros(1, 16, 128, 128), infer)
    assert [round(float(s), 4) for s in z] == ZIMAGE_STATES
    latent = torch.zeros(1, 128, 64, 64)  # 1024 x 1024 pixels
    official = N.recipe_bridge.rollout_states(model, settings_for(N, R, R.KLEIN, model), latent, infer)
    assert [round(float(s), 3 if s > 0.1 else 4) for s in official] == KLEIN_OFFICIAL_STATES_1024
    pack_settings = dict(settings_for(N, R, R.CUSTOM, model), schedule="auto")
    pack = N.recipe_bridge.rollout_states(model, pack_settings, latent, infer)
    assert [round(float(s), 3) for s in pack] == KLEIN_PACK_STATES_1024
    # the official states depend on each example's size (mu from h*w): 512^2 gives other states
    small = N.recipe_bridge.rollout_states(model, settings_for(N, R, R.KLEIN, model), torch.zeros(1, 128, 32, 32),
                                           infer)
    assert float(small[1]) != pytest.approx(float(official[1]), abs=1e-3)


# -- teacher prompts and the recipe on the trainer ---------------------------------------------------------

def klein_pairs(N, vae, position, instruction=KLEIN_INSTRUCTION, captions="a red [trigger] circle"):
    with executor_mode():
        ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(images(1), captions, "sks", 64)[0]
        return N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, klein_clip(), vae, instruction, position)[0]


@pytest.fixture(scope="module")
def klein_sets(N, flux2):
    """{instruction position: pairs} from the Reference Latent teacher with the official instruction."""
    _, vae = flux2
    return {p: klein_pairs(N, vae, p) for p in ("after caption (official klein)", "before caption")}


def test_klein_teacher_prompt_puts_the_instruction_after_the_caption(klein_sets):
    official = klein_sets["after caption (official klein)"][0]
    assert official.teacher_prompt == "a red sks circle " + KLEIN_INSTRUCTION
    want = encode(klein_clip(), "a red sks circle " + KLEIN_INSTRUCTION)
    assert torch.equal(official.teacher[0][0], want[0][0])
    assert official.teacher[0][1]["reference_latents"][0].shape == official.latent.shape
    assert not torch.equal(official.student[0][0], official.teacher[0][0])  # the student reads the caption alone
    pack = klein_sets["before caption"][0]
    assert pack.teacher_prompt == KLEIN_INSTRUCTION + " a red sks circle"


def run_recipe_job(N, model, pairs, recipe, loras_dir=None, **over):
    kwargs = dict(TRAINER_DEFAULTS, recipe=recipe, **over)
    with executor_mode():
        out = N.trainer_nodes.DOPSDTrainer.execute(model, pairs, **kwargs)
    job = N.jobs.get(out[0]["job_id"])
    return job, out


def test_klein_recipe_on_the_trainer_sets_every_knob_and_records_it(N, R, flux2, klein_sets, tmp_path):
    import folder_paths
    model, _ = flux2
    pairs = klein_sets["after caption (official klein)"]
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path)], old[1])
    try:
        job, out = run_recipe_job(N, model, pairs, R.KLEIN, save_prefix="klein_recipe", rank=2, learning_rate=0.5)
        examples = job.training.examples  # the job releases its training (and this) when it ends
        wait_state(job, ("running", "error", "finished"))
        job.stop(save=True)
        assert wait_state(job, ("stopped", "error", "finished")) == "stopped", job.error
    finally:
        folder_paths.folder_names_and_paths["loras"] = old
    text = out.ui["text"][0] if hasattr(out, "ui") else out[1]["text"][0]
    assert R.KLEIN in text and "rank = 64" in text and "learning_rate = 2e-05" in text
    cfg = job.cfg
    assert (cfg.steps, cfg.lr, cfg.loss_space, cfg.grad_accum, cfg.batch_size, cfg.precision) == \
        (3001, 2e-5, "x0", 4, 1, "bf16")
    assert job.net.loras[0].rank == 64 and job.net.loras[0].alpha == 128.0
    assert examples.drawn and examples.drawn[0][2] == "a red sks circle"  # the step went through the hook
    assert job.step >= 1 and len(examples.drawn) == 4 * job.step  # effective batch 4: 4 examples per update
    st = job.status()["recipe"]
    assert st["recipe"] == R.KLEIN and st["recipe_settings"]["rollout"] == "scheduler"
    from safetensors import safe_open
    with safe_open(job.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["dopsd.recipe"] == R.KLEIN
    assert json.loads(meta["dopsd.recipe_settings"])["teacher_prompt"] == "caption_then_instruction"


def test_zimage_recipe_on_the_trainer_saves_separate_q_k_v_that_comfyui_loads(N, R, zimage, tmp_path):
    import comfy.lora
    import folder_paths
    from comfyui_dopsd.nodes.pairs import Pair
    gen = torch.Generator().manual_seed(0)

    def cond(tokens):
        return [[torch.randn(1, tokens, F.ZIMAGE_TE_HIDDEN, generator=gen), {}]]
    pairs = [Pair("a sks cat", cond(6), cond(9), torch.zeros(1, 16, 8, 8), images(1))]
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path)], old[1])
    try:
        job, out = run_recipe_job(N, zimage, pairs, R.ZIMAGE, save_prefix="zimage_recipe", steps=3, rank=2)
        wait_state(job, ("running", "error", "finished"))
        job.stop(save=True)
        assert wait_state(job, ("stopped", "error", "finished")) == "stopped", job.error
    finally:
        folder_paths.folder_names_and_paths["loras"] = old
    assert [round(s, 4) for s in job.cfg.rollout_sigmas] == ZIMAGE_STATES
    assert (job.cfg.steps, job.cfg.lr, job.cfg.grad_accum) == (2000, 1e-4, 4)
    from safetensors.torch import load_file
    sd = load_file(job.lora_path)
    assert "diffusion_model.layers.0.attention.to_q.lora_down.weight" in sd
    assert sd["diffusion_model.layers.0.attention.to_q.lora_down.weight"].shape[0] == 64
    assert not any(".attention.qkv." in k for k in sd)
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(zimage.model, {}))
    assert len(patches) == len({k.rsplit(".lora_", 1)[0] for k in sd if k.endswith("lora_up.weight")})


def test_klein_recipe_refuses_the_wrong_family_and_the_wrong_prompt_order(N, R, zimage, flux2, klein_sets):
    model, _ = flux2
    with pytest.raises(ValueError, match="is for flux2 models.*official Z-Image-Turbo LoRA"):
        N.recipe_bridge.resolve(R.KLEIN, {}, zimage, [])
    with pytest.raises(ValueError, match="is for zimage models"):
        N.recipe_bridge.resolve(R.ZIMAGE, {}, model, [])
    wrong = klein_sets["before caption"]
    with pytest.raises(ValueError, match="instruction_position to 'after caption"):
        run_recipe_job(N, model, wrong, R.KLEIN)


# -- captions ----------------------------------------------------------------------------------------------

OFFICIAL_ROW = {"short_en": "[V] short", "medium_en": "[V] medium", "detailed_en": "[V] detailed",
                "user_prompt_en": "make [V]", "short_zh": "[V] 短", "medium_zh": "[V] 中", "detailed_zh": "[V] 详",
                "user_prompt_zh": "请 [V]"}


@pytest.fixture(scope="module")
def jsonl(N, flux2, tmp_path_factory):
    """One official-style JSONL row (eight caption fields) through the folder dataset (caption dropout 0.5) and
    the Reference Latent teacher: (dataset, pairs). Encoded once: the real klein encoder is slow on a CPU."""
    import folder_paths
    from PIL import Image
    _, vae = flux2
    root = tmp_path_factory.mktemp("jsonl")
    (root / "rows").mkdir()
    Image.fromarray((images(1, 64)[0].numpy() * 255).astype("uint8")).save(root / "rows" / "0.png")
    row = dict(OFFICIAL_ROW, local_path_list=["0.png"], **{"h*w": "64*64"})
    (root / "rows" / "data.jsonl").write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root))
    try:
        with executor_mode():
            ds = N.dataset_nodes.DOPSDDatasetFromFolder.execute("rows/data.jsonl", "", 64, "", 0.5)[0]
            return ds, N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, klein_clip(), vae, "",
                                                                           "before caption")[0]
    finally:
        folder_paths.set_input_directory(old)


class FakeTrainer:
    def __init__(self, order):
        self.order, self.sigmas = order, None


def drawn_sequence(N, pairs, seed, steps, order_state=None, dropout=None):
    from comfyui_dopsd.dopsd_core.data import BatchOrder
    order = BatchOrder([0] * len(pairs), 1, seed)
    if order_state:
        order.load_state_dict(order_state)
    setup = N.recipe_bridge.ExampleSetup(pairs, seed, "draw", dropout)
    setup.trainer = FakeTrainer(order)
    out = []
    for _ in range(steps):
        (index,) = order.next()
        conds = setup.begin(index)
        out.append((setup.drawn[-1][2], conds))
    return out, order.state_dict()


def test_jsonl_rows_carry_every_caption_field_and_the_draw_is_seeded_and_resumable(N, jsonl):
    ds, pairs = jsonl
    assert len(ds[0]["captions"]) == 8 and set(ds[0]["captions"]) == set(OFFICIAL_ROW.values())
    variants = [v[0] for v in pairs[0].variants]
    assert set(variants[:-1]) == set(OFFICIAL_ROW.values()) and variants[-1] == ""  # + the dropout variant
    for caption, student, teacher, _ in pairs[0].variants[:2]:  # each variant is its own encoding
        assert torch.equal(student[0][0], encode(klein_clip(), caption)[0][0])
        assert torch.equal(teacher[0][0], student[0][0]) and "reference_latents" in teacher[0][1]
    students = {v[0]: v[1] for v in pairs[0].variants}
    straight, _ = drawn_sequence(N, pairs, seed=5, steps=24, dropout=0.0)
    captions = [c for c, _ in straight]
    assert len(set(captions)) >= 6 and "" not in captions  # draws over the fields, not the first caption only
    for caption, conds in straight:  # the step's conditioning is the drawn caption's
        assert conds["positive"] is students[caption]
    again, _ = drawn_sequence(N, pairs, seed=5, steps=24, dropout=0.0)
    assert [c for c, _ in again] == captions
    first, state = drawn_sequence(N, pairs, seed=5, steps=9, dropout=0.0)
    rest, _ = drawn_sequence(N, pairs, seed=5, steps=15, order_state=state, dropout=0.0)
    assert [c for c, _ in first + rest] == captions  # a resumed job draws the same sequence
    other, _ = drawn_sequence(N, pairs, seed=6, steps=24, dropout=0.0)
    assert [c for c, _ in other] != captions


def test_caption_dropout_rate_and_the_official_recipe_turning_it_off(N, jsonl, pack):
    from comfyui_dopsd.dopsd_core import data
    draws = [data.draw_variant(3, e, i, 8, 0.25) for e in range(500) for i in range(8)]
    rate = sum(d is None for d in draws) / len(draws)
    assert abs(rate - 0.25) < 0.03
    assert data.draw_variant(3, 1, 2, 8, 0.0) is not None
    _, pairs = jsonl
    assert pairs[0].caption_dropout == 0.5 and pairs[0].variants[-1][0] == ""
    seq, _ = drawn_sequence(N, pairs, seed=1, steps=80)  # the dataset's rate (custom recipe)
    dropped = [conds for c, conds in seq if c == ""]
    assert 25 <= len(dropped) <= 55
    assert torch.equal(dropped[0]["positive"][0][0], encode(klein_clip(), "")[0][0])
    assert "reference_latents" in dropped[0]["teacher"][0][1]  # the teacher still sees the image
    off, _ = drawn_sequence(N, pairs, seed=1, steps=80, dropout=0.0)  # an official recipe: no dropout
    assert all(c != "" for c, _ in off)


def test_validation_checks_the_recipe_name_and_leaves_covered_inputs_to_an_official_recipe(N, R):
    validate = N.trainer_nodes.DOPSDTrainer.validate_inputs
    assert "unknown recipe 'paper'" in validate("", 3, 8, recipe="paper")
    assert "must divide" in validate("", 3, 8, recipe=R.CUSTOM)
    assert validate("", 3, 8, recipe=R.ZIMAGE) is True  # the recipe's 4 of 8 replace them
