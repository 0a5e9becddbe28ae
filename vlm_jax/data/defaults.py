"""`config.data` fields with defaults; family configs start here and override what they need."""
import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  # Root of generated/ingested data; "" = $VLM_JAX_DATA_DIR or ~/.cache/vlm_jax/sample_data.
  d.data_dir = ""
  d.vocab_path = ""  # "" = $VLM_JAX_VOCAB or the shipped data/tokenizer/sample.model
  d.mixture = "pretrain_simvlm"  # a catalog mixture or a single task name
  d.converter = "simvlm_prefix_lm"
  d.image_size = 64
  d.resize_mode = "pad"  # pad (letterbox) | crop (centre) | stretch
  d.prefix_length = 16  # Lp, encoder text slots
  d.suffix_length = 32  # Ls, decoder slots including EOS
  # Image-text pairs: probability of an empty text prefix (pure captioning); otherwise the
  # prefix length is uniform in [1, min(n - 1, Lp)]. Text documents always have p >= 1.
  d.pair_zero_prefix_prob = 0.5
  d.seed = 0  # shuffle/prefix seed; combined with the trainer's seed argument
  d.num_workers = 0  # grain worker processes; keep fixed across a resume
  d.worker_buffer_size = 2  # batches each worker prepares ahead
  d.read_threads = 4  # decode threads per process (main or worker)
  d.max_pixels = 64_000_000  # decompression-bomb guard: larger images are skipped
  # Skipped records: a rate-limited warning names shard and key; if more than
  # max_bad_fraction of the last bad_window records of one source were bad, raise.
  d.bad_window = 1000
  d.max_bad_fraction = 0.1
  d.warn_every_s = 10.0
  return d
