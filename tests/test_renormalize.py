"""Teacher-side normalisation: the student's normalised batch, renormalised, is the teacher's
own normalisation of the same pixels."""

import pytest
import torch

from kdgraph.transforms import Renormalize

STUDENT = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # e.g. a ViT's (inception) statistics
TEACHER = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's


def pixels(b=4, c=3, h=5, w=6):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(0))


def normalise(p, mean, std):
    return (p - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


@pytest.mark.parametrize("student,teacher", [(STUDENT, TEACHER), (TEACHER, STUDENT),
                                             (((0.2860,), (0.3530,)), ((0.1307,), (0.3081,)))])
def test_teacher_input_is_its_own_normalisation_of_the_pixels(student, teacher):
    p = pixels(c=len(student[0]))
    got = Renormalize(*student, *teacher)(normalise(p, *student))
    torch.testing.assert_close(got, normalise(p, *teacher), rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32


def test_equal_statistics_give_the_batch_back_bit_for_bit():
    x = normalise(pixels(), *TEACHER)
    assert Renormalize(*TEACHER, *TEACHER)(x) is x


def test_bf16_batches_stay_bf16():
    x = normalise(pixels(), *STUDENT).to(torch.bfloat16)
    assert Renormalize(*STUDENT, *TEACHER)(x).dtype == torch.bfloat16


def test_mismatched_channels_are_refused():
    with pytest.raises(ValueError, match="one value per channel"):
        Renormalize((0.5,), (0.5,), *TEACHER)
    with pytest.raises(ValueError, match="channels"):
        Renormalize(*STUDENT, *TEACHER)(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="std"):
        Renormalize((0.5,), (0.0,), (0.5,), (0.5,))


def test_renormalising_a_mixed_batch_is_mixing_the_renormalised_batch():
    """Mixup's weights sum to 1 and cutmix moves pixels, so both commute with a per-channel affine
    map: the runtime may mix the student's batch once and renormalise that for the teacher."""
    from kdgraph.transforms import MixupCutmix

    renorm = Renormalize(*STUDENT, *TEACHER)
    x = normalise(pixels(b=6), *STUDENT)
    y = torch.arange(6)
    mix = MixupCutmix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    for epoch in range(8):
        mixed, _ = mix(x, y, 0, epoch, range(6), 10)
        mixed_teacher, _ = mix(renorm(x), y, 0, epoch, range(6), 10)
        torch.testing.assert_close(renorm(mixed), mixed_teacher, rtol=1e-5, atol=1e-5)
