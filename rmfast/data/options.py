"""The data options every command-line tool reads rows with (rmfast-data inspect, rmfast-score), spelled,
defaulted and checked one way, and the same as rmfast-train's --data.* (defaults from DataConfig)."""

import argparse
import json

from .formats import FORMATS
from .groups import ULTRAFEEDBACK
from .loader import BAD_ROW_MODES, DataConfig
from .tokenize import OVERLONG

DEFAULTS = DataConfig()


def columns(text):
    """--columns: a JSON object from rmfast's column names to yours, or `ultrafeedback`."""
    if text is None:
        return {}
    if text.strip().lower() == "ultrafeedback":
        return dict(ULTRAFEEDBACK)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of column names (e.g. "
                                         '\'{"prompt": "instruction"}\') or ultrafeedback')
    return value


def add_data_options(parser, kinds, on_bad_row=DEFAULTS.on_bad_row):
    """--kind (one of kinds, auto first), --format, --columns, --max-length, --overlong, --chat-template,
    --on-bad-row."""
    group = parser.add_argument_group("data options (as rmfast-train's --data.*)")
    group.add_argument("--kind", default="auto", choices=["auto", *kinds],
                       help="what the rows are (auto: from the first row)")
    group.add_argument("--format", default=DEFAULTS.format, choices=FORMATS,
                       help=f"row format (default: {DEFAULTS.format})")
    group.add_argument("--columns", type=columns, default={},
                       help='your column names as JSON ({"prompt": "instruction", "responses": '
                            '"completions[].response"}), or ultrafeedback')
    group.add_argument("--max-length", type=int, default=DEFAULTS.max_length,
                       help=f"tokens per sequence (default: {DEFAULTS.max_length}, as rmfast-train)")
    group.add_argument("--overlong", default=DEFAULTS.overlong, choices=OVERLONG,
                       help=f"truncate over-long rows, or drop them (default: {DEFAULTS.overlong})")
    group.add_argument("--chat-template", help="Jinja chat template (text or file) for conversational rows "
                                               "(default: the tokenizer's)")
    group.add_argument("--on-bad-row", default=on_bad_row, choices=BAD_ROW_MODES,
                       help=f"stop on a bad row, or skip and count it (default: {on_bad_row})")
    return group


def data_config(args, **kw):
    """The DataConfig of parsed data options (sources from args.sources)."""
    return DataConfig(train=args.sources, format=args.format, columns=args.columns, max_length=args.max_length,
                      overlong=args.overlong, chat_template=args.chat_template, on_bad_row=args.on_bad_row, **kw)
