"""--recipe presets and the step registry behind --method."""

import pytest

from llmzip.cli import build_parser
from llmzip.config import METHODS, ROUNDERS, SMOOTHERS, ConfigError, recipe_steps
from llmzip.recipes import apply_recipe
from llmzip.steps import STEPS


def _args(*extra):
    args = build_parser().parse_args(["quantize", "m", "-o", "out", *extra])
    apply_recipe(args)
    return args


def test_every_method_is_a_list_of_registered_steps():
    assert set(STEPS) == set(SMOOTHERS + ROUNDERS)
    for method in METHODS[1:]:
        assert all(s in STEPS for s in recipe_steps(method)), method
    assert recipe_steps("awq") == ("awq", "rtn") and recipe_steps("awq+gptq") == ("awq", "gptq")


def test_recipes_fill_method_and_settings():
    assert _args().method == "rtn"
    assert _args("--recipe", "fast").method == "rtn"
    default = _args("--recipe", "default")
    assert (default.method, default.act_order) == ("gptq", True)
    for extra in ([], ["--bits", "8"], ["--bits", "3"], ["--bits", "2"], ["--avg-bits", "3.75"]):
        best = _args("--recipe", "best", *extra)
        assert (best.method, best.iters, best.tune_epochs) == ("signround", 50, 1), extra
    assert _args("--recipe", "best", "--bits", "2", "--tune-epochs", "3").tune_epochs == 3
    assert _args("--recipe", "default").tune_epochs is None  # off unless asked for
    best = _args("--recipe", "best", "--iters", "7")
    assert (best.method, best.iters) == ("signround", 7)  # an explicit option wins over the recipe


def test_recipe_and_method_together_is_a_clear_error():
    with pytest.raises(ConfigError, match="drop --method"):
        _args("--recipe", "fast", "--method", "gptq")


def test_clip_search_with_signround_is_a_clear_error():
    from llmzip.config import ClipSearch, QuantConfig

    with pytest.raises(ConfigError, match="drop --clip-search"):
        QuantConfig(method="signround", clip=ClipSearch())
    assert QuantConfig(method="signround").clip is None


def test_signround_options_reach_its_settings(monkeypatch):
    """--signround-lr/-batch/-loss/-target and --iters land in QuantConfig.signround as given;
    left out, they keep SignRoundSettings' defaults."""
    import llmzip.api
    from llmzip.commands import quantize
    from llmzip.config import SignRoundSettings

    seen = []

    def capture(model, config, **kw):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(llmzip.api, "quantize", capture)
    for extra in (["--iters", "50", "--signround-lr", "5e-3", "--signround-batch", "4", "--signround-loss",
                   "relative", "--signround-target", "layer"], []):
        with pytest.raises(SystemExit):
            quantize(_args("--method", "signround", *extra))
    given, default = seen[0].signround, seen[1].signround
    assert (given.iters, given.lr, given.batch, given.loss, given.target) == (50, 5e-3, 4, "relative", "layer")
    assert default == SignRoundSettings()
    assert given.step_size == 5e-3 and default.step_size == 1 / default.iters
