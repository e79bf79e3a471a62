"""`m2m infer` and `m2m test`: tiled whole-box inference as Dask tasks, into a prediction store.

The client checks everything it can before any work starts (store, fields,
checkpoint, model fit, norms, tile sizes), plans tiles with
`map2map.tiles.TilePlan`, creates the output store (or resumes it) and
submits one task per batch of tiles.  A task gets only small arguments (a
`Job` of paths, names and the plan, a sample number and tile numbers); in its
worker process it

1. reads each tile's input window (tile + halo, periodic wrap) through
   `map2map.data.fieldio.FieldStack`, the layer training reads through, which
   applies the input norms and stacks the fields along channels;
2. runs the model, loaded once per worker process and kept in the worker's
   `WorkerState` plugin (eval mode, inference mode, one forward pass per
   batch of tiles);
3. narrows the output to the tile (``scale_factor`` times finer), optionally
   scores it against the target field, undoes the target norms, and
4. writes it into the tile's own output region, a union of whole output
   shards that no other task touches, then records the tile as done with a
   small marker file, written atomically after the data.

A rerun with the same settings skips tiles that have a marker; the completion
mark (and the per-sample losses) is written only when every tile is done, and
the markers are removed just before it.  Every tile reads a window of the
same size whose origin differs from the whole-box window's by a multiple of
the model's total stride, so the stitched result equals one forward pass over
the whole periodically padded box.

The package, in the order a run goes through it: `specs` (the config and
the small specs every task gets), `defaults` (the checkpoint's model card
fills what the command leaves out), `inputs` and `planning` (checked on the
client before any work), `output` (the prediction store), `cluster`
(the Dask client and task submission), `worker` (the tasks), `markers`
(finished tiles, for resuming), `engine` (`run`, i.e. `m2m infer`) and `npy`
(`run_test`, i.e. `m2m test`).
"""

from map2map.infer.engine import InferSummary, run
from map2map.infer.markers import mark_done, read_done
from map2map.infer.npy import out_npy_path, write_npy
from map2map.infer.npy import run as run_test
from map2map.infer.specs import DONE_DIR, PARTIAL, InferConfig

__all__ = ["DONE_DIR", "PARTIAL", "InferConfig", "InferSummary", "mark_done", "out_npy_path", "read_done", "run",
           "run_test", "write_npy"]
