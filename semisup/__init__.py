"""semisup: semi-supervised Segment Anything for aerial imagery on Ray.

Module map, by layer (each module's own docstring says what it owns). Ray is imported only by
the modules marked [Ray]; everything else is plain Python, numpy and torch.

Data
    ``columns`` column names and sentinels · ``config`` typed configs · ``store`` the Zarr tile
    store · ``store_info`` its summary · ``tile_read`` / ``tile_reader`` reading tiles ·
    ``tile_boxes`` boxes inside a tile · ``bands`` band selection and scaling · ``data`` and
    ``_zarr_datasource`` streaming tiles [Ray] · ``known_imagery`` known datasets · ``synthetic``
    generated scenes · ``label_inputs`` / ``label_import`` / ``labelstudio`` ground truth in.

Models
    ``sam`` / ``sam_attention`` Segment Anything at any tile size · ``student`` the student and
    its adapters · ``onnx_student`` / ``export`` the exported student · ``detection/`` the Faster
    R-CNN student (model, targets, steps, training task, prediction, AP, comparison).

Teacher
    ``teacher`` the teachers (SAM masks, a student's classes) as actor classes, and
    ``TeacherConfig`` · ``masks`` SAM masks to pixel labels ·
    ``sam_prompts`` SAM prompts, automatic masks and instance rows ·
    ``pseudo_label`` labelling a store [Ray] · ``actor_pool`` actor pools and their config [Ray] ·
    ``zero_shot`` SAM before any training · ``calibration`` confidence against accuracy.

Training
    ``losses`` · ``thresholds`` how much each unlabeled pixel counts · ``augment`` weak/strong
    views · ``ema`` · ``collective`` sums over workers · ``sampling`` seeds and feeds ·
    ``steps`` one training step · ``train_state`` checkpoints · ``train_loop`` the per-worker
    loop [Ray] · ``train`` ``semisup train`` [Ray] · ``metrics`` · ``memory``.

Inference
    ``window_predictor`` the student that predicts, as a Ray Data actor class · ``predict``
    ``semisup predict`` [Ray] · ``raster_windows`` / ``stitch`` / ``blend`` / ``map_writer``
    windows in, one map out · ``vectorize`` polygons · ``evaluate`` a run's scores on chosen
    tiles.

Active learning and reports
    ``uncertainty`` per-pixel uncertainty · ``diversity`` diverse picks among uncertain tiles ·
    ``selection`` ``semisup select`` · ``labelling_round`` one round · ``report``
    ``semisup report`` · ``experiment`` the label-efficiency experiment.

Tuning
    ``search_space`` search spaces as data · ``tune`` ``semisup tune`` [Ray] · ``tune_report``.

Pipeline and command line
    ``stages`` the stages of ``semisup run`` · ``pipeline`` ``semisup run`` [Ray] · ``demo`` ·
    ``runtime`` starting Ray [Ray] · ``submit`` ``ray job submit`` [Ray] · ``cli``.
"""
