"""The demo's steps end to end on a tiny generated dataset: Beam -> Keras Tuner -> SavedModel -> gRPC."""

import pytest

from scripts.demo import DemoConfig, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory, mobilenet_weights):
    workdir = tmp_path_factory.mktemp("e2e")
    config = DemoConfig(workdir=str(workdir), per_class=16, image_size=48, weights=str(mobilenet_weights),
                        tuner="random", max_trials=2, epochs=2, batch_size=16)
    return run(config)


def test_every_held_out_image_gets_a_prediction(demo):
    # 16 per class at a 70/15/15 split leaves 3 test images in each of the 4 classes.
    assert len(demo.predictions) == 12
    assert {truth for _, truth, _, _ in demo.predictions} == {"circle", "square", "stripes", "triangle"}
    assert all(0.0 <= score <= 1.0 for *_, score in demo.predictions)


def test_grpc_predictions_match_the_trainers_own_evaluation(demo):
    assert demo.record_accuracy == pytest.approx(demo.trainer_accuracy)


def test_the_model_learned_the_sample_classes(demo):
    assert demo.accuracy >= 0.5  # chance is 0.25


def test_a_second_run_of_the_same_command_works(demo, mobilenet_weights):
    again = run(DemoConfig(workdir=str(demo.job_dir).rsplit("/job", 1)[0], per_class=16, image_size=48,
                           weights=str(mobilenet_weights), tuner="random", max_trials=2, epochs=2, batch_size=16))
    assert len(again.predictions) == len(demo.predictions)
    assert again.version >= demo.version


def test_the_demo_trains_a_users_photos_at_the_backbones_own_size():
    from scripts.demo import SAMPLE_IMAGE_SIZE, demo_image_size

    assert demo_image_size(DemoConfig()) == SAMPLE_IMAGE_SIZE == 64
    assert demo_image_size(DemoConfig(input="photos/")) == 224
    assert demo_image_size(DemoConfig(input="photos/", backbone="efficientnet_v2_s")) == 384
    assert demo_image_size(DemoConfig(input="photos/", image_size=160)) == 160


def test_the_demo_finds_a_manifests_relative_photos_beside_the_manifest(tmp_path):
    """A manifest's relative paths start at its folder (as preprocessing reads them), not at the CSV file."""
    from scripts.demo import photo_path

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n")
    assert photo_path(str(manifest), "pics/1.png") == str(tmp_path / "pics" / "1.png")
    assert photo_path(str(tmp_path), "cat/1.png") == str(tmp_path / "cat" / "1.png")
    assert photo_path(str(manifest), "/abs/1.png") == "/abs/1.png"
