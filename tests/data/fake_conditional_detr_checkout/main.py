import argparse


def get_args_parser():
    parser = argparse.ArgumentParser("fake Conditional DETR", add_help=False)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--enc_layers", default=6, type=int)
    parser.add_argument("--dec_layers", default=6, type=int)
    parser.add_argument("--dim_feedforward", default=2048, type=int)
    parser.add_argument("--dropout", default=0.1, type=float)
    parser.add_argument("--num_queries", default=300, type=int)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", default=42, type=int)
    return parser
