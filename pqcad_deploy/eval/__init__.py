"""FID evaluation: Inception pool3 features, Gaussian statistics and the Frechet distance.

Submodules are imported on demand (``from pqcad_deploy.eval.fid import ...``) so that importing the
package does not load torch or scipy.
"""

__all__: list[str] = []
