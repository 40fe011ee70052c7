"""Presets that extend another: a variant states only what it changes, merged section by
section over its parent; a missing parent or a cycle fails at load time in one line."""

from __future__ import annotations

import pytest

from engine import config
from engine.config import load_config
from engine.errors import FairsynthError


@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    """A presets folder of the test's own, so presets can extend each other there."""
    monkeypatch.setattr(config, "PRESET_DIR", tmp_path)

    def write(name: str, text: str) -> None:
        (tmp_path / f"{name}.yaml").write_text(text)

    return write


def test_a_preset_changes_only_what_it_states_over_the_presets_it_extends(preset_dir):
    preset_dir("base", "methods: [erm, lora]\nseed: 3\ndata:\n  builtin: {n_train: 64, n_val: 16}\n"
                       "generate: {steps: 3, guidance_scale: 2.0}\n")
    preset_dir("child", "extends: base\nmethods: [erm]\ndata:\n  builtin: {n_val: 24}\n")
    preset_dir("grandchild", "extends: child\ngenerate: {steps: 4}\n")
    cfg = load_config("grandchild", ["seed=5"])
    # Mappings merge key by key down the chain; a list replaces the parent's; --set comes last.
    assert (cfg.data.builtin.n_train, cfg.data.builtin.n_val) == (64, 24)
    assert (cfg.generate.steps, cfg.generate.guidance_scale) == (4, 2.0)
    assert cfg.methods == ["erm"] and cfg.seed == 5
    assert cfg.data.builtin.n_test == config.BuiltinConfig().n_test  # set nowhere: the default


@pytest.mark.parametrize(
    ("presets", "message"),
    [
        ({"a": "extends: nope\n"}, r"a\.yaml extends 'nope', which is not a preset in engine/configs/ \(known: a\)"),
        ({"a": "extends: b\n", "b": "extends: a\n"}, r"presets extend each other in a cycle \(a -> b -> a\)"),
        ({"a": "extends: a\n"}, r"cycle \(a -> a\)"),
    ],
)
def test_a_missing_parent_or_a_cycle_fails_in_one_line(preset_dir, presets, message):
    for name, text in presets.items():
        preset_dir(name, text)
    with pytest.raises(FairsynthError, match=message) as err:
        load_config("a")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dataset", ["waterbirds", "celeba", "utkface"])
def test_each_0999_preset_is_its_dataset_preset_at_severity_0999(dataset):
    expected = load_config(dataset).model_dump(mode="json")
    expected.update(run_dir=f"runs/{dataset}_0999", severities=[0.999])
    expected["data"]["severity"] = 0.999
    assert load_config(f"{dataset}_0999").model_dump(mode="json") == expected


def test_the_dataset_presets_share_every_paper_setting_but_their_data_and_prompts():
    paper = load_config("paper").model_dump(mode="json")
    own = {"run_dir", "data", "methods"}
    prompts = {"prompt_template", "identifier_template"}
    for dataset in ("waterbirds", "celeba", "utkface"):
        cfg = load_config(dataset).model_dump(mode="json")
        assert {k: v for k, v in cfg.items() if k not in own | {"generate"}} == {
            k: v for k, v in paper.items() if k not in own | {"generate"}}
        assert {k: v for k, v in cfg["generate"].items() if k not in prompts} == {
            k: v for k, v in paper["generate"].items() if k not in prompts}
        assert (cfg["data"]["name"], cfg["data"]["image_size"], cfg["data"]["severity"]) == (dataset, 224, "original")
        # Every method the data allows: the oracle draws built-in renders, so real data has none.
        assert cfg["methods"] == [m for m in paper["methods"] if m != "oracle"]


@pytest.mark.parametrize("key, template, needle", [
    ("generate.prompt_template", "a photo of a {class} on {attribute_name}",
     "has the unknown placeholder {class}; valid placeholders: {class_name}, {attribute_name}"),
    ("generate.identifier_template", "{identifier} {class_name.upper}", "unknown placeholder {class_name.upper}"),
    ("generate.negative_prompt_template", "{attribute_name}",
     "unknown placeholder {attribute_name}; valid placeholders: {source_attribute_name}"),
    ("generate.own_negative_prompt_template", "{other_class_names} {0}", "unknown placeholder {0}"),
    ("filter.class_prompt_template", "a photo of a {class_name", "cannot be filled (expected '}' before end of string)"),
    ("fidelity.class_prompt_template", "a photo of a {attribute_name}",
     "unknown placeholder {attribute_name}; valid placeholders: {class_name}"),
    ("fidelity.attribute_prompt_template", "a photo of {}", "unknown placeholder {}"),
])
def test_every_prompt_template_is_checked_when_the_config_loads(key, template, needle):
    with pytest.raises(FairsynthError) as err:
        load_config("tiny", [f'{key}="{template}"'])  # quoted: YAML reads a bare {x} as a mapping
    assert str(err.value).startswith(f"config error: {key} = {template!r}: ") and needle in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_templates_with_every_valid_placeholder_and_literal_braces_load():
    cfg = load_config("tiny", ["generate.identifier_template={identifier} {{x}} {class_name} {attribute_name}",
                               "filter.class_prompt_template=a photo of a {class_name} on {attribute_name}"])
    assert cfg.generate.identifier_template.format(identifier="sks", class_name="c", attribute_name="a") == "sks {x} c a"


def test_a_job_with_no_preset_runs_the_tiny_preset():
    assert load_config(None, ["seed=2"]).model_dump(mode="json") == load_config("tiny", ["seed=2"]).model_dump(mode="json")


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "method_overrides":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _at(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _extends_paper(name: str) -> bool:
    while name is not None:
        if name == "paper":
            return True
        name = config._read_preset(config.PRESET_DIR / f"{name}.yaml").get("extends")
    return False


def test_no_tiny_model_choice_reaches_a_paper_preset():
    """A value the tiny preset sets away from the defaults never shows in a preset built on
    paper.yaml (caption dropout 0.1 once reached every paper run this way)."""
    defaults = config.Config().model_dump(mode="json")
    tiny = load_config("tiny").model_dump(mode="json")
    choices = {key for key, _ in _leaves(config._read_preset(config.PRESET_DIR / "tiny.yaml"))
               if _at(tiny, key) != _at(defaults, key)}
    assert {"finetune.caption_dropout", "generate.guidance_scale", "train.method_overrides"} <= choices
    papers = [p.stem for p in sorted(config.PRESET_DIR.glob("*.yaml")) if _extends_paper(p.stem)]
    assert {"waterbirds_0999", "gpu_smoke"} <= set(papers)
    for name in papers:
        resolved = load_config(name).model_dump(mode="json")
        leaked = [key for key in choices if _at(resolved, key) == _at(tiny, key)]
        assert not leaked, (name, leaked)


@pytest.mark.parametrize("key", ["finetune.inject_failure_at_step", "train.inject_failure_at_epoch"])
def test_the_failure_hooks_of_the_tests_are_not_config_keys(key):
    with pytest.raises(FairsynthError, match=f"unknown key '{key}'"):
        load_config(None, [f"{key}=1"])
