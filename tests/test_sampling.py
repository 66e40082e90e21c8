"""sampling.py: the share of patches centred on a uniformly random voxel."""

import numpy as np
import pytest

from nnunet_ext.sampling import AddedRandomPatchesDataset, UniformPatchMixDataset, load_probability, with_added_patches

KEY = (-1, 0, 1, 2)


@pytest.mark.parametrize("fraction, batch, oversample, expected", [
    (0.5, 2, 0.33, 1.0),       # round(2 * 0.67) = 1 sample not oversampled -> it must always be uniform
    (0.5, 4, 0.33, 0.5 / 0.75),  # round(4 * 0.67) = 3 of 4 samples not oversampled
    (0.25, 2, 0.0, 0.25),      # no oversampling: every sample may be uniform
    (1.0, 2, 0.33, 1.0),       # capped
    (0.0, 2, 0.33, 0.0),
    (0.5, 1, 1.0, 0.0),        # every sample oversampled
])
def test_load_probability(fraction, batch, oversample, expected):
    assert load_probability(fraction, batch, oversample) == pytest.approx(expected)


def test_load_probability_rejects_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="uniform_fraction"):
        load_probability(1.5, 2, 0.33)


class FakeDataset:
    identifiers = ["a", "b"]

    def __init__(self):
        self.properties = {"class_locations": {KEY: np.array([[0, 1, 1, 1]]), 1: np.array([[0, 2, 2, 2]])},
                           "spacing": [1, 1, 1]}

    def load_case(self, identifier):
        return np.zeros((1, 3, 5, 7)), np.zeros((1, 3, 5, 7)), None, self.properties


def test_probability_one_replaces_only_the_annotated_locations_by_a_voxel_inside_the_volume():
    fake = FakeDataset()
    wrapped = UniformPatchMixDataset(fake, KEY, probability=1.0)
    assert wrapped.identifiers == ["a", "b"] and len(wrapped) == 2
    np.random.seed(0)
    seen = set()
    for _ in range(200):
        _, _, _, properties = wrapped.load_case("a")
        (voxel,) = properties["class_locations"][KEY]
        assert voxel[0] == 0 and 0 <= voxel[1] < 3 and 0 <= voxel[2] < 5 and 0 <= voxel[3] < 7
        seen.add(tuple(voxel))
        assert properties["class_locations"][1].tolist() == [[0, 2, 2, 2]]
        assert properties["spacing"] == [1, 1, 1]
    assert len(seen) > 50  # spread over the 105 voxels, not one fixed location
    # The dataset's own properties are never modified.
    assert fake.properties["class_locations"][KEY].tolist() == [[0, 1, 1, 1]]


def test_probability_zero_passes_cases_through():
    fake = FakeDataset()
    _, _, _, properties = UniformPatchMixDataset(fake, KEY, probability=0.0).load_case("b")
    assert properties is fake.properties


def test_intermediate_probability_replaces_about_that_share():
    wrapped = UniformPatchMixDataset(FakeDataset(), KEY, probability=0.3)
    np.random.seed(1)
    replaced = sum(wrapped.load_case("a")[3]["class_locations"][KEY].tolist() != [[0, 1, 1, 1]] for _ in range(2000))
    assert abs(replaced / 2000 - 0.3) < 0.04


def nnunet_oversamples(sample: int, batch_size: int, oversample: float) -> bool:
    """nnUNetDataLoader's rule (not probabilistic): the last samples of a batch are foreground-oversampled."""
    return not sample < round(batch_size * (1 - oversample))


@pytest.mark.parametrize("batch, oversample, added, expected", [
    (2, 0.33, 2, (4, 0.25)),     # 2 added + round(2 * 0.67) = 1 -> 3 of 4 not oversampled
    (4, 0.33, 2, (6, 1 / 6)),    # 2 added + round(4 * 0.67) = 3 -> 5 of 6
    (2, 0.33, 0, (2, 0.33)),     # nothing added: nnU-Net's values untouched
    (3, 0.0, 1, (4, 0.0)),
])
def test_with_added_patches(batch, oversample, added, expected):
    total, percent = with_added_patches(batch, oversample, added)
    assert total == expected[0] and percent == pytest.approx(expected[1])


@pytest.mark.parametrize("batch, oversample, added", [(2, 0.33, 2), (12, 0.33, 6), (5, 0.5, 3), (1, 1.0, 1)])
def test_added_patches_are_never_oversampled_and_the_rest_is_oversampled_as_stocks_batch(batch, oversample, added):
    total, percent = with_added_patches(batch, oversample, added)
    got = [nnunet_oversamples(j, total, percent) for j in range(total)]
    assert got == [False] * added + [nnunet_oversamples(j, batch, oversample) for j in range(batch)]


def test_with_added_patches_rejects_a_negative_count():
    with pytest.raises(ValueError, match="added"):
        with_added_patches(2, 0.33, -1)


def test_the_first_added_loads_of_every_batch_are_centred_at_random_and_the_rest_pass_through():
    fake = FakeDataset()
    wrapped = AddedRandomPatchesDataset(fake, KEY, batch_size=3, added=1)
    assert wrapped.identifiers == ["a", "b"] and len(wrapped) == 2
    np.random.seed(0)
    loads = [wrapped.load_case("a")[3] for _ in range(6)]  # two batches of 3
    for position, properties in enumerate(loads):
        if position % 3 == 0:
            (voxel,) = properties["class_locations"][KEY]
            assert voxel[0] == 0 and 0 <= voxel[1] < 3 and 0 <= voxel[2] < 5 and 0 <= voxel[3] < 7
            assert properties["class_locations"][1].tolist() == [[0, 2, 2, 2]]
        else:
            assert properties is fake.properties


def test_more_added_patches_than_the_batch_holds_is_refused():
    with pytest.raises(ValueError, match="added must be in"):
        AddedRandomPatchesDataset(FakeDataset(), KEY, batch_size=2, added=3)
