"""Evaluates sample batches against a reference batch with ADM's metrics and Inception graph.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [SAMPLE2.npz ...] [--backend tensorflow|torch]
        [--device cuda] [--batch-size 64] [--inception-graph PATH] [--output-json PATH]

Prints Inception Score, FID, sFID, Precision and Recall as ADM's evaluator does, and writes them
as JSON next to the sample batch (SAMPLE.metrics.json; --output-json for a single batch).
Several sample batches (a sweep of guidance scales, say) are scored in turn against the
reference's activations, computed once, and summarised in a table at the end. The
tensorflow backend (default) runs ADM's graph through TensorFlow as ADM does; the torch backend
runs it rebuilt in PyTorch on CPU or GPU, without TensorFlow. A batch that carries precomputed mu,
sigma, mu_s, sigma_s (e.g. VIRTUAL_imagenet256_labeled.npz) has its FID and sFID statistics
taken from them; its images still give precision and recall.
"""
import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations import metrics
from evaluations.inception import (POOL_DIM, SPATIAL_DIM, InceptionGraphNotFound, add_inception_arguments,
                                   compute_activations, find_inception_graph, load_inception)
from evaluations.npz_batches import ImageBatchFile, NpzFormatError, read_precomputed_statistics
from runtime.io import atomic_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference batch npz (uint8 images in arr_0, optional statistics)")
    parser.add_argument("sample_batches", nargs="+", help="sample batch npz files (uint8 images in arr_0)")
    parser.add_argument("--inception-graph", default=None,
                        help="path of classify_image_graph_def.pb (default: next to this script, "
                             "then the working directory)")
    parser.add_argument("--output-json", default=None,
                        help="where to write the metrics of a single sample batch "
                             "(default: SAMPLE.metrics.json next to each sample batch)")
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be positive, got {args.batch_size}")
    if args.output_json and len(args.sample_batches) > 1:
        raise SystemExit("error: --output-json names the file of a single sample batch; "
                         "several write SAMPLE.metrics.json each")
    return args


def default_json_path(sample_path):
    stem = sample_path[:-len(".npz")] if sample_path.endswith(".npz") else sample_path
    return f"{stem}.metrics.json"


class EvaluationBatch:
    """One npz batch, checked up front: its images and any precomputed statistics."""

    def __init__(self, path):
        self.path = path
        self.images = ImageBatchFile(path, min_images=metrics.MIN_MANIFOLD_SIZE)
        self.precomputed = read_precomputed_statistics(path, POOL_DIM, SPATIAL_DIM)

    def activations(self, inception, batch_size, description):
        start = time.perf_counter()
        activations = compute_activations(
            inception, self.images.batches(batch_size), self.images.num_images,
            accumulate_statistics=self.precomputed is None, description=description,
        )
        seconds = time.perf_counter() - start
        print(f"{description}: {self.images.num_images} images in {seconds:.1f} s "
              f"({self.images.num_images / seconds:.1f} images/s)")
        if self.precomputed is not None:
            activations = activations._replace(pool_statistics=self.precomputed[0],
                                               spatial_statistics=self.precomputed[1])
        return activations


def score(samples, reference_acts, inception, batch_size):
    """Metrics of `samples` (an EvaluationBatch) against the reference's activations, as a dict."""
    print("computing sample batch activations...")
    sample_acts = samples.activations(inception, batch_size, "samples")
    print("computing evaluations...")
    precision, recall = metrics.precision_recall(reference_acts.pool_features, sample_acts.pool_features)
    return {
        "inception_score": metrics.inception_score(sample_acts.pool_features, inception.logit_weights),
        "fid": metrics.statistics_distance(sample_acts.pool_statistics, reference_acts.pool_statistics),
        "sfid": metrics.statistics_distance(sample_acts.spatial_statistics, reference_acts.spatial_statistics),
        "precision": precision,
        "recall": recall,
    }


def report(results):
    """The result lines of ADM's evaluator."""
    return "\n".join([
        f"Inception Score: {results['inception_score']}",
        f"FID: {results['fid']}",
        f"sFID: {results['sfid']}",
        f"Precision: {results['precision']}",
        f"Recall: {results['recall']}",
    ])


def summary_table(sample_batches, results):
    """A Markdown table of every sample batch's metrics, one row each."""
    lines = ["| sample batch | Inception Score | FID | sFID | Precision | Recall |", "|---|---|---|---|---|---|"]
    for samples, row in zip(sample_batches, results):
        lines.append(f"| {samples.path} | {row['inception_score']:.2f} | {row['fid']:.2f} | {row['sfid']:.2f} "
                     f"| {row['precision']:.4f} | {row['recall']:.4f} |")
    return "\n".join(lines)


def write_record(json_path, results, reference, samples, graph_path, backend):
    record = {**results, "reference_batch": os.path.abspath(reference.path),
              "sample_batch": os.path.abspath(samples.path),
              "num_reference_images": reference.images.num_images,
              "num_sample_images": samples.images.num_images,
              "inception_graph": os.path.abspath(graph_path), "backend": backend}
    with atomic_path(json_path) as tmp, open(tmp, "w") as file:
        json.dump(record, file, indent=2)
    print(f"wrote {json_path}")


def main(argv=None):
    """Scores every sample batch; returns their metrics, in order, as dicts."""
    args = parse_args(argv)
    try:
        graph_path = find_inception_graph(args.inception_graph)
        reference = EvaluationBatch(args.ref_batch)
        sample_batches = [EvaluationBatch(path) for path in args.sample_batches]
    except (InceptionGraphNotFound, NpzFormatError) as error:
        raise SystemExit(f"error: {error}") from None

    try:
        inception = load_inception(args.backend, graph_path, args.device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    results = []
    with inception:
        print("computing reference batch activations...")
        reference_acts = reference.activations(inception, args.batch_size, "reference")
        for samples in sample_batches:  # each recorded when it is ready: a failure later keeps it
            if len(sample_batches) > 1:
                print(f"\n== {samples.path}")
            results.append(score(samples, reference_acts, inception, args.batch_size))
            print(report(results[-1]))
            write_record(args.output_json or default_json_path(samples.path), results[-1], reference, samples,
                         graph_path, args.backend)
    if len(sample_batches) > 1:
        print("\n" + summary_table(sample_batches, results))
    return results


if __name__ == "__main__":
    main()
