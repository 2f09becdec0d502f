"""The model registry is the only place that knows a model: a third, tiny model registered from
inside this test (no package file edited) runs through train, search (2 trials, real Ray),
reproduce and report, in process, as the built-in models do."""

from __future__ import annotations

import pytest
from torch import nn

from tune_pets import models, report, reproduce, search, train
from tune_pets.config import RunConfig
from tune_pets.layout import Layout
from tune_pets.records import ReproduceResult, SearchSummary

SPACE = """\
model: tiny
metric: val_acc
mode: max
num_samples: 2
max_epochs: 2
grace_period: 1
max_concurrent: 2
resources: {cpu: 1, gpu: 0}
space:
  lr: {loguniform: [1.0e-3, 1.0e-1]}
"""


@pytest.fixture
def tiny_model():
    """A 'tiny' images model: global mean colour -> linear. Defined inside the fixture, so Ray
    workers receive it by value with the spec (the trainable gets the spec, not a name)."""

    class MeanColour(nn.Module):
        def __init__(self, num_classes: int):
            super().__init__()
            self.head = nn.Linear(3, num_classes)

        def forward(self, x):
            return self.head(x.mean(dim=(2, 3)))

    cnn = models.get_spec("cnn")
    spec = models.register(
        models.ModelSpec(
            name="tiny",
            kind="images",
            help="mean colour + linear (a test model)",
            defaults=RunConfig(model="tiny", epochs=2, batch_size=8, img_size=24, lr=0.05),
            build=lambda cfg, n: MeanColour(n),
            data_config=cnn.data_config,
        )
    )
    yield spec
    models.unregister("tiny")


@pytest.mark.slow
def test_a_registered_model_runs_through_every_command(tiny_model, tiny_data, tmp_path):
    art, runs, cache = tmp_path / "artifacts", tmp_path / "runs", tmp_path / "cache"
    layout = Layout(art, runs)
    common = ["--data-dir", str(tiny_data), "--cache-dir", str(cache), "--no-progress"]
    out = ["--artifacts-dir", str(art), "--runs-dir", str(runs)]
    assert "tiny" in train.build_parser().format_help()

    assert train.main(["tiny", *common, *out, "--epochs", "1"]) == 0
    assert layout.train_run("tiny").joinpath("checkpoint_best.pt").is_file()

    space = tmp_path / "tiny.yaml"
    space.write_text(SPACE)
    argv = ["tiny", "--search-space", str(space), *common, *out, "--num-cpus", "2"]
    assert search.main(argv) == 0
    best = SearchSummary.read(layout.best_config("tiny"), "best_config")
    assert best.model == "tiny" and best.search["num_trials"] == 2

    assert reproduce.main(["tiny", *common, *out, "--profile-steps", "2"]) == 0
    result = ReproduceResult.read(layout.result_metrics("tiny"), "metrics")
    assert result.trial_id == best.trial_id and 0.0 <= result.test_acc <= 1.0

    assert report.main(["--artifacts-dir", str(art)]) == 0
    text = layout.report.read_text()
    assert "## tiny" in text and f"{result.test_acc:.4f}" in text
