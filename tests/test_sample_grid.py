"""The sample grid training writes: prompt text, reference rendering and seeds, laid out and labeled."""
import numpy as np
from PIL import ImageFont

from trainer.config import SampleConfig
from trainer.inference import LABEL_FONT_SIZE, LABEL_WIDTH, labeled_grid, labeled_grid_size, wrap_text
from trainer.observers import grid_title

SIDE, SCALE, PAD = 8, 2, 2


def solid(value: int) -> np.ndarray:
    return np.full((SIDE, SIDE, 3), value, dtype=np.uint8)


def test_labeled_grid_places_images_and_draws_every_label():
    rows = [[solid(10 * (3 * i + j + 1)) for j in range(3)] for i in range(2)]  # 2 rows x 3 columns
    prompts = ["two small red squares on the left", "a large blue circle at the top"]
    grid = np.asarray(labeled_grid(rows, prompts, ["reference", "seed 0", "seed 1"], scale=SCALE, title="step 7"))
    assert grid.shape[1::-1] == labeled_grid_size(2, 3, SIDE, SCALE)
    header = grid.shape[0] - (2 * (SIDE + PAD) + PAD) * SCALE
    for i in range(2):
        for j in range(3):  # every image where image_grid puts it, upscaled
            y, x = header + (PAD + i * (SIDE + PAD)) * SCALE, LABEL_WIDTH + (PAD + j * (SIDE + PAD)) * SCALE
            assert (grid[y:y + SIDE * SCALE, x:x + SIDE * SCALE] == 10 * (3 * i + j + 1)).all(), (i, j)
        band = grid[header + i * (SIDE + PAD) * SCALE:header + (i + 1) * (SIDE + PAD) * SCALE, :LABEL_WIDTH]
        assert (band < 128).any(), f"row {i}: no prompt text drawn"
    assert (grid[:header, LABEL_WIDTH:] < 128).any() and (grid[:header // 2, :LABEL_WIDTH] < 128).any()


def test_wrap_text_keeps_lines_within_width_and_every_word():
    font = ImageFont.load_default(LABEL_FONT_SIZE)
    text = "three large green triangles at the bottom of the picture"
    lines = wrap_text(text, font, 90)
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(font.getlength(line) <= 90 for line in lines if " " in line)


def test_grid_title_names_the_sampling_settings():
    assert grid_title(SampleConfig(steps=30, cfg_scale=2.5, use_mean=False), 1500) == \
        "step 1500: z0 = mu + sigma * eps, cfg scale 2.5, 30 euler steps"
    assert "VE mean" in grid_title(SampleConfig(use_mean=True), 1)
