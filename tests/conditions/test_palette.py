import numpy as np
import pytest

from pipelines.conditions.palette import (
    NUM_BINS,
    PaletteConfig,
    PaletteExtractor,
    bin_centres,
    bin_colours,
    chi2,
    histogram_intersection,
    palette_from_hex,
    palette_of,
    render_palette,
    srgb_to_lab,
)
from tests.conditions.contract import assert_contract, make_batch

RED, BLUE = (255, 0, 0), (0, 0, 255)
# Bins of the authors' layout (module docstring): k = 13 * hue + row; grays 143 (white) .. 155 (black).
RED_BIN, BLUE_BIN = 13 * 0 + 5, 13 * 7 + 5
WHITE_BIN, GRAY_BIN, BLACK_BIN = 143, 149, 155


def solid(*colours: tuple[int, int, int], size: int = 8) -> np.ndarray:
    """(1, size, size, 3) uint8 image split into equal vertical stripes of ``colours``."""
    img = np.zeros((1, size, size, 3), np.uint8)
    for i, c in enumerate(colours):
        img[0, :, i * size // len(colours) : (i + 1) * size // len(colours)] = c
    return img


def test_contract():
    out = assert_contract(PaletteExtractor(PaletteConfig(), 32), make_batch(4, 32))
    np.testing.assert_allclose(out["palette"].astype(np.float32).sum(1), 1.0, atol=1e-2)


def test_contract_unsmoothed():
    assert_contract(PaletteExtractor(PaletteConfig(sigma=0.0), 16), make_batch(3, 16, seed=1))


def test_batch_invariance_across_batch_sizes():
    imgs = make_batch(7, 24, seed=2)["image"]
    whole = palette_of(imgs)
    parts = np.concatenate([palette_of(imgs[:3]), palette_of(imgs[3:4]), palette_of(imgs[4:])])
    np.testing.assert_array_equal(whole, parts)


def test_config_validates_sigma():
    with pytest.raises(ValueError, match="sigma"):
        PaletteConfig(sigma=-1.0)


def test_layout_matches_the_authors_table():
    c = bin_centres()
    assert c.shape == (NUM_BINS, 3) and c.dtype == np.float32
    rgb = bin_colours()
    assert tuple(rgb[RED_BIN]) == RED
    assert rgb[BLUE_BIN][2] == 255 and rgb[BLUE_BIN][:2].max() <= 2  # hue 0.666, not quite 2/3
    assert tuple(rgb[WHITE_BIN]) == (255, 255, 255) and tuple(rgb[BLACK_BIN]) == (0, 0, 0)
    np.testing.assert_allclose(c[143:, 1:], 0, atol=0.01)  # grays are achromatic
    assert np.all(np.diff(c[143:, 0]) < 0)  # white to black


def test_lab_matches_skimage():
    from skimage.color import rgb2lab

    rgb = np.random.default_rng(0).integers(0, 256, (500, 3)).astype(np.uint8)
    np.testing.assert_allclose(srgb_to_lab(rgb), rgb2lab(rgb[:, None])[:, 0], atol=1e-9)


def test_bins_are_the_exact_nearest_centres():
    from skimage.color import rgb2lab

    img = np.random.default_rng(1).integers(0, 256, (1, 40, 50, 3)).astype(np.uint8)
    lab = rgb2lab(img[0]).reshape(-1, 1, 3)
    nearest = ((lab - bin_centres().astype(np.float64)) ** 2).sum(-1).argmin(1)
    expected = np.bincount(nearest, minlength=NUM_BINS) / nearest.size
    np.testing.assert_allclose(palette_of(img, sigma=0.0)[0], expected, atol=1e-12)


@pytest.mark.parametrize(
    "colour, bin_",
    [
        (RED, RED_BIN),
        (BLUE, BLUE_BIN),
        ((255, 255, 255), WHITE_BIN),
        ((128, 128, 128), GRAY_BIN),
        ((0, 0, 0), BLACK_BIN),
    ],
)
def test_solid_colour_lands_in_its_bin(colour, bin_):
    raw = palette_of(solid(colour), sigma=0.0)[0]
    assert raw.argmax() == bin_ and raw[bin_] == 1.0
    smoothed = palette_of(solid(colour))[0]
    assert smoothed.argmax() == bin_
    assert smoothed.sum() == pytest.approx(1.0)


def test_achromatic_images_stay_on_the_gray_axis():
    for level in (0, 60, 128, 200, 255):
        raw = palette_of(solid((level,) * 3), sigma=0.0)[0]
        assert raw.argmax() >= 143


def test_two_colours_give_two_equal_peaks():
    raw = palette_of(solid(RED, BLUE), sigma=0.0)[0]
    assert set(np.flatnonzero(raw)) == {RED_BIN, BLUE_BIN}
    assert raw[RED_BIN] == raw[BLUE_BIN] == 0.5
    smoothed = palette_of(solid(RED, BLUE))[0]
    assert set(np.argsort(smoothed)[-2:]) == {RED_BIN, BLUE_BIN}
    # The authors' kernel is row-normalised, so it does not conserve each colour's mass exactly:
    # the bins nearer red than blue (in Lab) hold about half of the smoothed palette.
    lab = bin_centres().astype(np.float64)
    d_red = ((lab - srgb_to_lab(np.array(RED, np.uint8))) ** 2).sum(1)
    d_blue = ((lab - srgb_to_lab(np.array(BLUE, np.uint8))) ** 2).sum(1)
    assert smoothed[d_red < d_blue].sum() == pytest.approx(0.5, abs=0.05)


def test_palette_from_hex_matches_a_painted_image():
    np.testing.assert_allclose(palette_from_hex(["#ff0000"]), palette_of(solid(RED))[0], atol=1e-6)
    two = palette_from_hex(["#f00", "0000ff"])
    assert two.dtype == np.float32 and two.shape == (NUM_BINS,)
    np.testing.assert_allclose(two, palette_of(solid(RED, BLUE))[0], atol=1e-6)
    weighted = palette_from_hex(["#ff0000", "#0000ff"], [3, 1], sigma=0.0)
    assert weighted[RED_BIN] == pytest.approx(0.75) and weighted[BLUE_BIN] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="hex colour"):
        palette_from_hex(["red"])
    with pytest.raises(ValueError, match="weights"):
        palette_from_hex(["#ff0000"], [1, 2])


def test_distances():
    a = palette_of(solid(RED))[0]
    b = palette_of(solid(BLUE))[0]
    assert chi2(a, a) == 0.0
    assert histogram_intersection(a, a) == pytest.approx(1.0)
    assert 0 < chi2(a, b) <= 1 and 0 <= histogram_intersection(a, b) < 1
    batch = np.stack([a, b])
    np.testing.assert_allclose(chi2(batch, batch[::-1]), [chi2(a, b)] * 2)
    with pytest.raises(ValueError, match="shapes"):
        chi2(a, a[:10])


def test_render_palette():
    pic = render_palette(palette_from_hex(["#ff0000", "#0000ff"], [3, 1]), width=100, height=10)
    assert pic.shape == (10, 100, 3) and pic.dtype == np.uint8
    assert tuple(pic[5, 0]) == RED  # the largest bar comes first
    assert (pic == pic[:1]).all()  # vertical bars
    assert tuple(render_palette(palette_of(solid((0, 0, 0)), sigma=0.0)[0])[0, -1]) == (0, 0, 0)
    with pytest.raises(ValueError):
        render_palette(np.zeros(NUM_BINS))


def test_bin_table_is_the_exact_search_and_is_cached(tmp_path, monkeypatch):
    from pipelines.conditions import palette as P

    monkeypatch.setenv("RECOMPOSE_CACHE", str(tmp_path))
    P._bin_table.cache_clear()
    try:
        table = P._bin_table()
        (cached,) = tmp_path.glob("palette-bins-*.npy")
        packed = np.random.default_rng(0).integers(0, 1 << 24, 50_000).astype(np.uint32)
        np.testing.assert_array_equal(table[packed], P._nearest_bins(P._unpack(packed)))
        cached.write_bytes(b"not a table")  # a damaged cache is recomputed, not trusted
        P._bin_table.cache_clear()
        np.testing.assert_array_equal(P._bin_table(), table)
        # the layout the extractor reads (r | g << 8 | b << 16), cached beside it
        P._bin_table_rgba.cache_clear()
        rgba = P._bin_table_rgba()
        assert (tmp_path / cached.name.replace("palette-bins-", "palette-bins-rgba-")).is_file()
        p = P._unpack(packed).astype(np.uint32)
        np.testing.assert_array_equal(rgba[p[:, 0] | p[:, 1] << 8 | p[:, 2] << 16], table[packed])
        P._bin_table_rgba.cache_clear()
        np.testing.assert_array_equal(P._bin_table_rgba(), rgba)
    finally:
        P._bin_table.cache_clear()
        P._bin_table_rgba.cache_clear()


def test_hsv_conversion_is_scikit_images():
    from skimage.color import hsv2rgb

    from pipelines.conditions import palette as P

    hsv = np.random.default_rng(0).random((2000, 3))
    hsv[:12, 0] = [0, 1 / 6, 2 / 6, 0.5, 4 / 6, 5 / 6, 1, 0.9999, *P._HUES[[1, 6, 9, 10]]]
    hsv[:12, 1:] = [1.0, 0.4]
    np.testing.assert_array_equal(P._hsv2rgb(hsv), hsv2rgb(hsv))
