"""`semisup predict`: windowed prediction of real and synthetic GeoTIFFs and tile stores, blended
without seams, resumable, memory-bounded, with vectors; bad input refused before any output."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.features
import torch
from rasterio.transform import from_origin
from store_factory import SourceSpec, build_store, write_large_geotiff

from semisup import blend
from semisup import columns as C
from semisup.actor_pool import ActorPoolConfig
from semisup.cli import main as semisup_main
from semisup.config import ExperimentConfig, TrainConfig, save_config
from semisup.map_writer import MapWriter, partial_path, progress_path
from semisup.memory import wait_for_exit
from semisup.predict import PredictConfig, output_path, run_predict
from semisup.raster_windows import RasterSource, open_sources, read_strip
from semisup.sam import build_sam
from semisup.stitch import Stitcher, plan_jobs
from semisup.student import AdapterError, build_student, save_adapter
from semisup.vectorize import write_geojson
from semisup.window_predictor import JOB, PROBABILITIES, WindowPredictor, load_model, resolve_model

VEGAS = "spacenet_vegas/sample_geotiff.tif"  # 900×900, 1 band uint16, EPSG:32616
NEON = "neon_trees/OSBS_029.tif"  # 400×400 RGB uint8, EPSG:32617, a few nodata pixels
# One torch thread per actor: two were measured slower on these shared 2-core machines.
FAST = PredictConfig(batch_size=8, pool=ActorPoolConfig(actors=1, torch_threads=1))


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.read(2)


def _write_geotiff(
    path: Path, image: np.ndarray, crs: str | None = "EPSG:32640", **extra: Any
) -> Path:
    """``image`` H×W×C as a tiled GeoTIFF (0.5 m pixels when ``crs`` is given)."""
    profile = {
        "driver": "GTiff",
        "height": image.shape[0],
        "width": image.shape[1],
        "count": image.shape[2],
        "dtype": image.dtype.name,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        **extra,
    }
    if crs is not None:
        profile |= {"crs": crs, "transform": from_origin(500_000.0, 4_000_000.0, 0.5, 0.5)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.moveaxis(image, -1, 0))
    return path


def _nothing_written(folder: Path) -> bool:
    return not [
        p for p in folder.rglob("*") if p.suffix in (".tif", ".partial", ".json", ".geojson")
    ]


# ---------------------------------------------------------------------------------------------
# Without Ray: readers, the driver's blender and writer, models, errors


def test_read_strip_pads_and_scales_geotiff_and_store_windows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, (70, 90, 1), dtype=np.uint16)
    path = _write_geotiff(tmp_path / "pan.tif", image)
    made = build_store(
        str(tmp_path / "s.zarr"), [SourceSpec("a", 70, 90, nodata_box=(0, 0, 10, 10))], tile_size=32
    )
    geotiff, store_source = open_sources([path, tmp_path / "s.zarr"])
    assert (geotiff.bands, store_source.name, store_source.source_id) == (1, "a", "a")
    windows = read_strip(geotiff, 40, [0, 60], 48)  # the second window reaches past the edge
    low, high = geotiff.band_low[0], geotiff.band_high[0]
    expected = np.clip((image[40:70, 60:90, 0].astype(np.float32) - low) / (high - low), 0, 1)
    assert windows[C.IMAGE].shape == (2, 3, 48, 48)
    for band in range(3):  # the single band replicated
        np.testing.assert_allclose(windows[C.IMAGE][1, band, :30, :30], expected, rtol=1e-6)
    assert windows[C.VALID][1, :30, :30].all() and not windows[C.VALID][1, 30:].any()
    windows = read_strip(store_source, 0, [0], 32)
    np.testing.assert_allclose(
        windows[C.IMAGE][0].transpose(1, 2, 0), made.images["a"][:32, :32] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(windows[C.VALID][0], made.valid["a"][:32, :32])


def test_driver_blends_shuffled_windows_across_stripes_exactly(tmp_path: Path) -> None:
    """Windows that agree on their overlaps, delivered in random order across two stripes,
    come out of the driver (reorder buffer, blender, GeoTIFF writer) as the field's argmax."""
    height, width, tile, overlap, k = 300, 700, 128, 32, 3
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(k, height + tile, width + tile)).astype(np.float32) * 3
    field = np.exp(logits) / np.exp(logits).sum(0)
    source = RasterSource("x.tif", "x", height, width, 3, "uint8", (0.0,) * 3, (255.0,) * 3)
    writer = MapWriter(
        tmp_path / "x.tif",
        height=height,
        width=width,
        crs=None,
        transform=None,
        stripes=blend.stripe_bounds(width, 512),
        identity={"test": 1},
        cog=False,
    )
    writer.start()
    jobs = plan_jobs([(source, writer)], tile, overlap)
    rows = []
    for job in jobs:
        col_starts = blend.window_starts(width, tile, overlap)
        for x0 in col_starts[job.first_col : job.last_col]:
            rows.append((job.seq, job.y0, x0))
    rng.shuffle(rows)
    assembler = Stitcher(jobs, [(source, writer)], k, blend.window_weights(tile, overlap))
    for start in range(0, len(rows), 7):
        part = rows[start : start + 7]
        assembler.add(
            {
                JOB: np.array([r[0] for r in part]),
                C.Y0: np.array([r[1] for r in part]),
                C.X0: np.array([r[2] for r in part]),
                PROBABILITIES: np.stack([field[:, y : y + tile, x : x + tile] for _, y, x in part]),
                C.VALID: np.ones((len(part), tile, tile), bool),
            }
        )
    assert assembler.finished == [0] and writer.complete and progress_path(writer.path).exists()
    writer.finish()
    label, confidence = _read(tmp_path / "x.tif")
    np.testing.assert_array_equal(label, field[:, :height, :width].argmax(0))
    assert not partial_path(writer.path).exists() and not progress_path(writer.path).exists()


def test_output_names_for_one_or_several_rasters(tmp_path: Path) -> None:
    source = RasterSource("/data/a.tif", "a", 1, 1, 3, "uint8", (0.0,) * 3, (255.0,) * 3)
    assert output_path(tmp_path / "x.tif", source, 1, ".tif") == tmp_path / "x.tif"
    assert output_path(tmp_path / "maps", source, 1, ".tif") == tmp_path / "maps" / "a.tif"
    assert output_path(tmp_path / "v.json", source, 1, ".geojson") == tmp_path / "v.json"
    pattern = tmp_path / "{name}_classes.tif"
    assert output_path(pattern, source, 3, ".tif") == tmp_path / "a_classes.tif"
    with pytest.raises(ValueError, match="several rasters need a folder"):
        output_path(tmp_path / "x.tiff", source, 2, ".tif")


def test_run_folder_gives_the_trained_adapter_on_its_seeded_base(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    save_config(ExperimentConfig(train=TrainConfig(seed=3)), run / "config.yaml")
    torch.manual_seed(3)  # as train does before build_student
    trained = build_student("tiny", 2, 64, mode="decoder").eval()
    save_adapter(trained, run / "best" / "adapter.safetensors")
    model = resolve_model(str(run), workdir=tmp_path)
    assert (model.seed, model.base_checkpoint, model.image_size) == (3, None, 64)
    image = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = trained(image)
        np.testing.assert_allclose(load_model(model)(image), expected, atol=1e-5)
        other_seed = resolve_model(str(run), workdir=tmp_path, seed=4)
        assert not torch.allclose(load_model(other_seed)(image), expected, atol=1e-3)


def test_adapter_of_another_base_is_refused_before_any_output(tmp_path: Path) -> None:
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        checkpoints.append(tmp_path / f"sam_{seed}.pth")
        torch.save(build_sam("tiny", image_size=64).state_dict(), checkpoints[-1])
    adapter = save_adapter(
        build_student("tiny", 2, 64, checkpoint=checkpoints[0]), tmp_path / "a.safetensors"
    )
    raster = _write_geotiff(tmp_path / "in.tif", np.zeros((64, 64, 3), np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    for base in (str(checkpoints[1]), None):
        with pytest.raises(AdapterError, match="adapter for the tiny base"):
            run_predict(
                [raster],
                str(adapter),
                out / "map.tif",
                PredictConfig(base_checkpoint=base),
                log=None,
            )
    with pytest.raises(ValueError, match="trained on 64 px windows"):
        run_predict(
            [raster],
            str(adapter),
            out / "map.tif",
            PredictConfig(base_checkpoint=str(checkpoints[0]), tile_size=128),
            log=None,
        )
    assert _nothing_written(out)


def test_bad_rasters_are_refused_before_any_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    no_crs = _write_geotiff(tmp_path / "plain.tif", np.zeros((64, 64, 3), np.uint8), crs=None)
    with pytest.raises(ValueError, match="plain.tif has no CRS"):
        run_predict([no_crs], "tiny", out / "map.tif", vector=out / "map.geojson", log=None)
    two_bands = _write_geotiff(tmp_path / "two.tif", np.zeros((64, 64, 2), np.uint16))
    with pytest.raises(ValueError, match="two.tif has 2 bands; the student takes 3"):
        run_predict([two_bands], "tiny", out / "map.tif", log=None)
    with pytest.raises(FileNotFoundError, match="missing.tif: no such raster"):
        run_predict([tmp_path / "missing.tif"], "tiny", out / "map.tif", log=None)
    with pytest.raises(FileNotFoundError, match="not a run directory, an adapter file"):
        run_predict([no_crs], "vit_q", out / "map.tif", log=None)
    with pytest.raises(ValueError, match="several rasters need a folder"):
        run_predict([no_crs, no_crs], "tiny", out / "map.tif", log=None)
    assert _nothing_written(out)
    assert (
        semisup_main(["predict", str(two_bands), "--model", "tiny", "--out", str(out / "m.tif")])
        == 2
    )


def test_polygons_dissolve_across_bands_of_rows(tmp_path: Path) -> None:
    """Polygonising 37 rows at a time gives the regions of polygonising the raster whole."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 3, (12, 16)).astype(np.uint8)
    label = np.kron(coarse, np.ones((10, 10), np.uint8))[:113, :150]  # blocky regions
    label[50:60, 20:40] = 255  # nodata
    path = _write_geotiff(tmp_path / "classes.tif", label[..., None], nodata=255)
    count = write_geojson(path, tmp_path / "p.geojson", rows_per_band=37)
    whole = list(rasterio.features.shapes(label, mask=label != 255, connectivity=4))
    assert count == len(whole)
    collection = json.loads((tmp_path / "p.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32640"
    with rasterio.open(path) as ds:
        burned = rasterio.features.rasterize(
            [(f["geometry"], f["properties"]["class"]) for f in collection["features"]],
            out_shape=label.shape,
            transform=ds.transform,
            fill=255,
        )
    np.testing.assert_array_equal(burned, label)
    big = write_geojson(path, tmp_path / "big.geojson", min_area=100 * 0.25, rows_per_band=37)
    areas = [
        f["properties"]["area"]
        for f in json.loads((tmp_path / "big.geojson").read_text())["features"]
    ]
    assert 0 < big < count and min(areas) >= 25.0


# ---------------------------------------------------------------------------------------------
# With Ray


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_real_geotiffs_keep_crs_transform_shape_nodata_and_vectors_fit(
    ray_session: None, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vegas, neon = shared_data / VEGAS, shared_data / NEON
    with rasterio.open(vegas) as ds:  # the same pixels as three identical bands
        _write_geotiff(
            tmp_path / "vegas_rgb.tif",
            np.repeat(ds.read(1)[..., None], 3, -1),
            crs=ds.crs,
            transform=ds.transform,
        )
    maps = tmp_path / "maps"
    argv = [
        "predict",
        str(vegas),
        str(neon),
        str(tmp_path / "vegas_rgb.tif"),
        "--model",
        "tiny",
        "--num-classes",
        "3",
        "--out",
        str(maps),
        "--vector",
        str(maps),
        "--torch-threads",
        "1",
        "--cog",
    ]
    assert semisup_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [o["status"] for o in summary["outputs"]] == ["written"] * 3
    assert summary["pixels"] == 2 * 900 * 900 + 400 * 400
    for raster in (vegas, neon):
        out = maps / f"{raster.stem}.tif"
        with rasterio.open(raster) as src, rasterio.open(out) as ds:
            assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
            assert ds.count == 2 and ds.dtypes == ("uint8", "uint8") and ds.nodata == 255
            assert ds.descriptions == ("class", "confidence_percent") and ds.is_tiled
            assert ds.overviews(1) == ([2] if raster == vegas else [])  # COG: 512 px blocks
            label, confidence = ds.read(1), ds.read(2)
            valid = src.dataset_mask() > 0
            np.testing.assert_array_equal(label != 255, valid)  # nodata kept, nothing else
            assert label[valid].max() < 3 and len(np.unique(label[valid])) > 1
            assert confidence[valid].min() >= 33 and confidence[valid].max() <= 100  # ≥ 1/K
            bounds, epsg = ds.bounds, src.crs.to_epsg()
        collection = json.loads((maps / f"{raster.stem}.geojson").read_text())
        assert collection["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{epsg}"
        points = np.concatenate(
            [
                np.asarray(ring)
                for f in collection["features"]
                for ring in f["geometry"]["coordinates"]
            ]
        )
        assert points[:, 0].min() >= bounds.left and points[:, 0].max() <= bounds.right
        assert points[:, 1].min() >= bounds.bottom and points[:, 1].max() <= bounds.top
        burned = rasterio.features.rasterize(
            [(f["geometry"], f["properties"]["class"]) for f in collection["features"]],
            out_shape=label.shape,
            transform=ds.transform,
            fill=255,
        )
        np.testing.assert_array_equal(burned, label)  # polygons are exactly the class map
    # the band rule: one band replicated is the same input as three identical bands
    np.testing.assert_array_equal(
        _read(maps / "vegas_rgb.tif")[0], _read(maps / "sample_geotiff.tif")[0]
    )
    assert semisup_main(argv) == 0  # a rerun finds everything done
    again = json.loads(capsys.readouterr().out)
    assert [o["status"] for o in again["outputs"]] == ["already complete"] * 3
    assert again["windows"] == 0


def _seam_ratio(label: np.ndarray, valid: np.ndarray, borders: list[int]) -> float:
    """Class changes between neighbouring pixels across the lines at ``borders`` (rows and
    columns), relative to the median over all lines; pairs with a nodata pixel left out."""
    rates = []
    for axis in (0, 1):
        a, b = (label[:-1], label[1:]) if axis == 0 else (label[:, :-1], label[:, 1:])
        both = (valid[:-1] & valid[1:]) if axis == 0 else (valid[:, :-1] & valid[:, 1:])
        change = ((a != b) & both).sum(axis=1 - axis) / np.maximum(both.sum(axis=1 - axis), 1)
        rates.append(change)
    lines = np.concatenate(rates)
    at_borders = np.concatenate([rate[[b - 1 for b in borders]] for rate in rates])
    return float(at_borders.mean() / np.median(lines))


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("raster", "side"), [(NEON, 400), pytest.param(VEGAS, 900, marks=pytest.mark.slow)]
)
def test_tiled_with_overlap_matches_whole_without_seams(
    ray_session: None, shared_data: Path, tmp_path: Path, raster: str, side: int
) -> None:
    """The same random-init tiny student (its weights do not depend on the window size) on the
    whole raster as one window and on 256 px windows. SAM attends globally, so windows see
    different context and cannot agree exactly; blending must keep the class map as close to
    the whole prediction as the windows allow, with no seam along window borders. Flat weights
    (overlap 0; the moved last window still overlaps) show what a seam looks like here. A tile
    store's source rides along in one run: nodata kept there too."""
    path = shared_data / raster
    made = build_store(
        str(tmp_path / "s.zarr"),
        [SourceSpec("a", 150, 300, nodata_box=(0, 0, 40, 60))],
        tile_size=64,
    )
    whole_tile = -(-side // 16) * 16  # a multiple of SAM's patch
    maps = {}
    for name, tile, overlap, extra in (
        ("whole", whole_tile, 0, []),
        ("tiled", 256, 64, []),
        ("flat", 256, 0, [tmp_path / "s.zarr"]),
    ):
        summary = run_predict(
            [path, *extra],
            "tiny",
            tmp_path / name,
            replace(FAST, tile_size=tile, overlap=overlap, num_classes=3),
            log=None,
        )
        maps[name] = _read(tmp_path / name / f"{path.stem}.tif")[0]
    assert summary["outputs"][1]["status"] == "written"  # the store's source
    store_map = _read(tmp_path / "flat" / "a.tif")[0]
    np.testing.assert_array_equal(store_map == 255, ~made.valid["a"])
    valid = maps["whole"] != 255
    agree = {name: float((maps[name] == maps["whole"])[valid].mean()) for name in ("tiled", "flat")}
    starts = blend.window_starts(side, 256, 64)
    borders = sorted({*starts[1:], *(start + 256 for start in starts[:-1])})
    seams = {name: _seam_ratio(maps[name], valid, borders) for name in ("tiled", "flat", "whole")}
    assert agree["tiled"] >= 0.85 and agree["tiled"] > agree["flat"], agree
    # most window borders are also borders of SAM's 16 px patches, where the whole prediction
    # changes class more often too: compare each map with the whole one on the same lines
    assert seams["tiled"] < 1.2 * seams["whole"] < 1.3 * seams["whole"] < seams["flat"], seams


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(
    ray_session: None, tmp_path: Path
) -> None:
    raster = write_large_geotiff(tmp_path / "scene.tif", 1024)
    settings = replace(FAST, tile_size=256, overlap=64, stripe_width=512, num_classes=3)
    reference = run_predict([raster], "tiny", tmp_path / "reference.tif", settings, log=None)
    total = reference["windows"]

    class Interrupt(Exception):
        pass

    def stop_early(done: int, total: int) -> None:
        if done >= total // 3:  # within the first stripe, past its first block of rows
            raise Interrupt

    out = tmp_path / "out.tif"
    with pytest.raises(Interrupt):
        run_predict([raster], "tiny", out, settings, on_progress=stop_early, log=None)
    assert not out.exists() and partial_path(out).exists()  # never looks complete
    record = json.loads(progress_path(out).read_text())
    assert 0 < sum(record["rows_done"]) < 2 * 1024
    with pytest.raises(FileExistsError, match="interrupted run with other settings"):
        run_predict([raster], "tiny", out, replace(settings, overlap=16), log=None)
    resumed = run_predict([raster], "tiny", out, settings, log=None)
    assert resumed["outputs"][0]["status"] == "resumed"
    assert 0 < resumed["windows"] < total
    for got, want in zip(_read(out), _read(tmp_path / "reference.tif"), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not partial_path(out).exists() and not progress_path(out).exists()


def _peak_above_baseline(tmp_path: Path, size: int) -> float:
    raster = write_large_geotiff(tmp_path / f"r{size}.tif", size)
    wait_for_exit("MapWorker")  # the actors of earlier runs
    summary = run_predict(
        [raster],
        "tiny",
        tmp_path / f"m{size}.tif",
        replace(FAST, stripe_width=1024),
        measure_memory=True,
        log=None,
    )
    return float(summary["peak_predict_memory_mb"] - summary["baseline_predict_memory_mb"])


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "sizes", [(1024, 3072), pytest.param((2048, 4096), marks=pytest.mark.slow)], ids=str
)
def test_peak_memory_stays_flat_as_the_raster_grows(
    ray_session: None, tmp_path: Path, sizes: tuple[int, int]
) -> None:
    """The unique memory (USS, sampled) of the driver and the predictor actor: 4-9× the pixels
    must not need more. Ray's own processes, started once per session, are left out, and so
    are the object store's shared pages, which stay resident as data cycles through the store.
    Whole-raster buffers (image as float32, class sums, weights: (3 + 3 + 1) × 4 bytes per
    pixel) would be 252 MiB at 3072², 448 MiB at 4096². Measured noise: 50-100 MiB (the
    actor's allocator and GDAL's block cache settle as it runs)."""
    small, large = (_peak_above_baseline(tmp_path, size) for size in sizes)
    whole_raster_mb = sizes[1] ** 2 * 7 * 4 / 2**20
    assert large - small < max(100.0, 0.25 * whole_raster_mb), (small, large)


# ---------------------------------------------------------------------------------------------
# Adapters of one base, swapped


def _region_adapters(tmp_path: Path) -> list[Path]:
    """Two decoder adapters of the random-init tiny base drawn by seed 0, decoders apart."""
    adapters = []
    for index, name in enumerate(("region_a", "region_b")):
        torch.manual_seed(0)  # the base resolve_model rebuilds with --seed 0
        model = build_student("tiny", 3, 64, mode="decoder")
        generator = torch.Generator().manual_seed(10 + index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        adapters.append(save_adapter(model, tmp_path / f"{name}.safetensors"))
    return adapters


def test_actor_loads_the_base_once_and_swaps_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One predictor, jobs of two adapters in turn (a, b, a): each job's windows as a predictor
    of that adapter alone gives them, bit for bit, and the base was built once."""
    import semisup.student

    raster = _write_geotiff(
        tmp_path / "in.tif",
        np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8),
    )
    models = [
        asdict(resolve_model(str(path), workdir=tmp_path)) for path in _region_adapters(tmp_path)
    ]
    sources = open_sources([raster]) * 2  # output 0 by adapter a, output 1 by adapter b
    builds = []
    build = semisup.student.build_student
    monkeypatch.setattr(
        semisup.student, "build_student", lambda *a, **k: builds.append(1) or build(*a, **k)
    )
    swapping = WindowPredictor(models, sources, 64, 16, output_models=[0, 1])
    alone = [WindowPredictor([model], sources, 64, 16) for model in models]
    for output in (0, 1, 0):
        job = {
            "seq": np.array([output]),
            "output": np.array([output]),
            "y0": np.array([0]),
            "first_col": np.array([0]),
            "last_col": np.array([2]),
        }
        got = swapping(job)[PROBABILITIES]
        np.testing.assert_array_equal(got, alone[output](job)[PROBABILITIES])
        assert got.any()
    assert not np.array_equal(alone[0](job)[PROBABILITIES], alone[1](job)[PROBABILITIES])
    assert len(builds) == 3  # once for the swapping predictor, once for each alone


def test_adapters_of_another_base_or_layout_are_not_swapped(tmp_path: Path) -> None:
    raster = _write_geotiff(tmp_path / "in.tif", np.zeros((64, 64, 3), np.uint8))
    region_a, _ = _region_adapters(tmp_path)
    torch.manual_seed(0)
    lora = save_adapter(build_student("tiny", 3, 64, mode="lora"), tmp_path / "lora.safetensors")
    out = tmp_path / "maps" / "{adapter}.tif"
    with pytest.raises(ValueError, match="--model .*lora.safetensors: its adapter layout"):
        run_predict([raster], [str(region_a), str(lora)], out, PredictConfig(seed=0), log=None)
    four = save_adapter(build_student("tiny", 4, 64, mode="decoder"), tmp_path / "four.safetensors")
    with pytest.raises(ValueError, match=r"--model .*four.safetensors: its base \(tiny/4 classes"):
        run_predict([raster], [str(region_a), str(four)], out, PredictConfig(seed=0), log=None)
    assert not (tmp_path / "maps").exists()


@pytest.mark.slow  # three Ray runs; the test above checks the actor without Ray
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_swapped_adapters_write_the_maps_of_separately_loaded_models(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raster = write_large_geotiff(tmp_path / "scene.tif", 256, rows=256)
    adapters = _region_adapters(tmp_path)
    argv = [
        "predict",
        str(raster),
        "--model",
        str(adapters[0]),
        "--model",
        str(adapters[1]),
        "--seed",
        "0",
        "--out",
        str(tmp_path / "maps" / "{adapter}.tif"),
        "--torch-threads",
        "1",
    ]
    assert semisup_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [o["adapter"] for o in summary["outputs"]] == ["region_a", "region_b"]
    for adapter in adapters:
        alone = tmp_path / f"alone_{adapter.stem}.tif"
        run_predict([raster], str(adapter), alone, replace(FAST, seed=0), log=None)
        for got, want in zip(
            _read(tmp_path / "maps" / f"{adapter.stem}.tif"), _read(alone), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(*(_read(tmp_path / "maps" / f"{a.stem}.tif")[0] for a in adapters))
    with pytest.raises(ValueError, match=r"several --model need \{adapter\}"):
        run_predict(
            [raster],
            [str(a) for a in adapters],
            tmp_path / "x.tif",
            replace(FAST, seed=0),
            log=None,
        )
