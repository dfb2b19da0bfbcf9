"""The official implementations' reference outputs, written from checkouts of their repositories."""
