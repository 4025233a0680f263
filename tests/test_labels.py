"""Label handling without a store: colour maps, label rasters and box files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.boxes import clip_boxes, encode_labels, read_box_csv, read_box_file, read_voc_xml
from data_prep.errors import PrepError
from data_prep.labels import (
    LabelRaster,
    UnknownColorsError,
    check_color_map_ids,
    color_map_num_classes,
    colors_to_ids,
    out_of_range_ids,
    parse_color_map,
)
from semisup.columns import IGNORE_INDEX

COLOURS = {"#3C1098": 0, "#8429F6": 1, "#6EC1E4": 2, "#000000": 255}


def _rgb(hex_colours: list[list[str]]) -> np.ndarray:
    """H×W grid of "#RRGGBB" -> H×W×3 uint8."""
    return np.array(
        [[[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in row] for row in hex_colours],
        dtype=np.uint8,
    )


# ---------------------------------------------------------------------------------------------
# Colour maps (pure functions)


def test_colors_to_ids_maps_every_pixel_and_ignore() -> None:
    rgb = _rgb([["#3C1098", "#8429F6"], ["#6EC1E4", "#000000"]])
    ids = colors_to_ids(rgb, parse_color_map(COLOURS))
    assert ids.dtype == np.uint8 and ids.shape == (2, 2)
    assert ids.tolist() == [[0, 1], [2, IGNORE_INDEX]]


def test_colors_to_ids_lists_unknown_colours_with_pixel_counts() -> None:
    rgb = _rgb([["#3C1098", "#FF0000", "#FF0000"], ["#00FF00", "#000000", "#FF0000"]])
    with pytest.raises(UnknownColorsError) as err:
        colors_to_ids(rgb, parse_color_map(COLOURS))
    assert err.value.counts == {"#FF0000": 3, "#00FF00": 1}
    assert "#FF0000 (3 px)" in str(err.value) and "#00FF00 (1 px)" in str(err.value)


def test_parse_color_map_accepts_case_and_missing_hash() -> None:
    assert parse_color_map({"#ffffff": 1, "000000": 0}) == {0xFFFFFF: 1, 0x000000: 0}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"#12345": 0}, "'#12345'"),
        ({"#123456": 256}, "256"),
        ({"#123456": -1}, "-1"),
        ({"#123456": "road"}, "'road'"),
        ({"#abcdef": 0, "#ABCDEF": 1}, "#ABCDEF is listed twice"),
        ({}, "non-empty"),
    ],
)
def test_parse_color_map_rejects_bad_entries(data: dict, message: str) -> None:
    with pytest.raises(PrepError, match="my.json") as err:
        parse_color_map(data, source="my.json")
    assert message in str(err.value)


def test_color_map_num_classes_ignores_255() -> None:
    assert color_map_num_classes(parse_color_map(COLOURS)) == 3
    assert color_map_num_classes(parse_color_map({"#000000": 255})) is None


def test_check_color_map_ids_names_the_colour_and_range() -> None:
    with pytest.raises(PrepError, match=r"label id out of range: #6EC1E4 -> 2.*num_classes=2"):
        check_color_map_ids(parse_color_map(COLOURS), num_classes=2, source="c.json")
    check_color_map_ids(parse_color_map(COLOURS), num_classes=3)


def test_out_of_range_ids() -> None:
    ids = np.array([0, 1, 2, 5, 255, 300, -1, 5])
    assert out_of_range_ids(ids, 3).tolist() == [-1, 5, 300]
    assert out_of_range_ids(ids, None).tolist() == [-1, 300]  # inferred: any 0..254 is a class
    assert out_of_range_ids(np.array([0, 255], dtype=np.uint8), 1).size == 0


# ---------------------------------------------------------------------------------------------
# Label rasters


def test_palette_mask_with_colour_map_is_read_through_its_palette(tmp_path: Path) -> None:
    rgb = _rgb([["#3C1098", "#8429F6", "#000000"], ["#6EC1E4", "#3C1098", "#8429F6"]])
    path = tmp_path / "mask.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    assert Image.open(path).mode == "P"
    label = LabelRaster(path, parse_color_map(COLOURS), num_classes=3)
    assert label.read_ids(0, 0, 2, 3).tolist() == [[0, 1, 255], [2, 0, 1]]


def test_palette_mask_without_colour_map_holds_class_ids(tmp_path: Path) -> None:
    # Pascal-VOC convention: the palette index is the class id, 255 is void.
    ids = np.array([[0, 1, 255], [2, 2, 0]], dtype=np.uint8)
    image = Image.fromarray(ids, mode="L").convert("P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    path = tmp_path / "voc.png"
    image.save(path)
    label = LabelRaster(path, None, num_classes=3)
    assert label.read_ids(0, 0, 2, 3).tolist() == ids.tolist()


def test_grey_mask_with_colour_map_reads_grey_hex(tmp_path: Path) -> None:
    mask = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    path = tmp_path / "footprints.png"
    Image.fromarray(mask).save(path)
    label = LabelRaster(path, parse_color_map({"#000000": 0, "#FFFFFF": 1}), num_classes=None)
    assert label.read_ids(0, 0, 2, 2).tolist() == [[0, 1], [1, 0]]
    assert label.max_id == 1


def test_transparent_label_pixels_are_ignored(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = _rgb([["#3C1098", "#8429F6"], ["#8429F6", "#3C1098"]])
    rgba[..., 3] = [[255, 0], [255, 255]]
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    label = LabelRaster(path, parse_color_map(COLOURS), num_classes=3)
    assert label.read_ids(0, 0, 2, 2).tolist() == [[0, IGNORE_INDEX], [1, 0]]


def test_colour_mask_without_colour_map_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    with pytest.raises(PrepError, match=r"rgb\.png.*--label-colors"):
        LabelRaster(path, None, num_classes=None)


def test_class_id_raster_out_of_range_names_file_ids_and_range(tmp_path: Path) -> None:
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[0, 1, 7], [9, 255, 2]], dtype=np.uint8))
    label = LabelRaster(path, None, num_classes=3)
    with pytest.raises(PrepError) as err:
        label.read_ids(0, 0, 2, 3)
    message = str(err.value)
    assert "ids.npy" in message and "label id out of range: 7, 9" in message
    assert "[0, 2] or 255" in message


# ---------------------------------------------------------------------------------------------
# Box files


def test_box_csv_columns_are_read_by_header_name(tmp_path: Path) -> None:
    path = tmp_path / "truth.csv"
    path.write_text(
        "image_path,xmin,xmax,ymin,ymax,label\n"
        "a.tif,1,82,103,235,0\n"
        "b.tif,10,20,30,40,1\n"
        "a.tif,5,6,7,8,1\n"
    )
    sets = read_box_csv(path)
    assert [s.image_ref for s in sets] == ["a.tif", "b.tif"]
    assert sets[0].boxes.tolist() == [[1, 103, 82, 235], [5, 7, 6, 8]]
    assert sets[0].labels == ("0", "1") and sets[0].boxes.dtype == np.float32


def test_box_csv_without_label_column_gets_one_class(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text("ymax,xmax,ymin,xmin,image_path\n4,3,2,1,dir/img.png\n")
    (box_set,) = read_box_file(path)
    assert box_set.boxes.tolist() == [[1, 2, 3, 4]]
    assert box_set.labels == ("object",) and box_set.image_stem == "img"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image_path,xmin,ymin,xmax\na,1,2,3\n", "missing column(s) ymax"),
        ("image_path,xmin,ymin,xmax,ymax\na,1,two,3,4\n", "line 2: ymin = 'two' is not a number"),
        ("image_path,xmin,ymin,xmax,ymax\na,5,2,3,4\n", "xmax < xmin"),
    ],
)
def test_bad_box_csv_names_file_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PrepError, match="bad.csv") as err:
        read_box_file(path)
    assert message in str(err.value)


def test_voc_xml(tmp_path: Path) -> None:
    path = tmp_path / "x.xml"
    path.write_text(
        "<annotation><filename>scene.png</filename>"
        "<object><name>Dead</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax>"
        "<ymax>4</ymax></bndbox></object>"
        "<object><name>Alive</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>7</xmax>"
        "<ymax>8</ymax></bndbox></object></annotation>"
    )
    box_set = read_voc_xml(path)
    assert box_set.image_stem == "scene"
    assert box_set.boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    names, index = encode_labels(box_set.labels)
    assert names == ("Alive", "Dead") and index.tolist() == [1, 0]


def test_real_neon_box_files(shared_data: Path) -> None:
    neon = shared_data / "neon_trees"
    (osbs,) = read_box_file(neon / "OSBS_029.csv")
    (sjer,) = read_box_file(neon / "2018_SJER_3_252000_4107000_image_477_truth.csv")
    (soap,) = read_box_file(neon / "SOAP_061.xml")
    assert (len(osbs.boxes), len(sjer.boxes), len(soap.boxes)) == (61, 7, 37)
    assert osbs.boxes[0].tolist() == [203, 67, 227, 90]  # xmin,ymin,xmax,ymax order in file
    assert sjer.boxes[0].tolist() == [1, 103, 82, 235]  # file order is xmin,xmax,ymin,ymax
    assert soap.image_stem == "SOAP_061" and set(soap.labels) == {"Alive", "Dead"}


def test_clip_boxes_clips_and_rejects_boxes_outside() -> None:
    boxes = np.array([[-5, 2, 12, 8]], dtype=np.float32)
    assert clip_boxes(boxes, height=10, width=10, source="s").tolist() == [[0, 2, 10, 8]]
    with pytest.raises(PrepError, match="outside the 10x10 image"):
        clip_boxes(np.array([[11, 0, 15, 5]], dtype=np.float32), 10, 10, "s")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_nodata_label_pixels_are_ignored_not_range_checked(tmp_path: Path) -> None:
    import rasterio

    ids = np.array([[0, 1, -9999], [2, -9999, 1]], dtype=np.int16)
    path = tmp_path / "ids.tif"
    profile = {"driver": "GTiff", "width": 3, "height": 2, "count": 1, "dtype": "int16"}
    with rasterio.open(path, "w", **profile, nodata=-9999) as ds:
        ds.write(ids, 1)
    label = LabelRaster(path, None, num_classes=3)
    assert label.read_ids(0, 0, 2, 3).tolist() == [[0, 1, 255], [2, 255, 1]]
