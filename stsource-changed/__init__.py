"""stsource-changed/ shipped inside the cst package as ``reconciler.stsource``; see its README.

This file is not part of the overlay: it only makes the folder a package, so a wheel carries it."""
