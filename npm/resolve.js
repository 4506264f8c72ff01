// Which package holds this platform's lb binary, and where it is. Pure (environment and
// resolver passed in) so that a test can ask it about another platform.
'use strict';

/** The platform packages lb-sticky ships, by `${platform}-${arch}-${libc}`. */
const PACKAGES = { 'linux-x64-gnu': '@lb-sticky/linux-x64-gnu' };

/** glibc or musl on Linux (process.report says which C library Node runs on). */
function libc(report = () => process.report.getReport()) {
  if (process.platform !== 'linux') return '';
  try {
    return report().header.glibcVersionRuntime ? 'gnu' : 'musl';
  } catch {
    return 'gnu';
  }
}

function platformKey(p = {}) {
  const platform = p.platform ?? process.platform;
  const arch = p.arch ?? process.arch;
  const c = p.libc ?? libc();
  return c ? `${platform}-${arch}-${c}` : `${platform}-${arch}`;
}

function platformPackage(p) {
  return PACKAGES[platformKey(p)];
}

/**
 * `{path}` of the lb binary, or `{error}`: one line naming the platform and what to do.
 * LB_BINARY=/path/to/lb overrides the lookup (a build from source).
 */
function findBinary(env, resolve, p) {
  if (env.LB_BINARY) return { path: env.LB_BINARY };
  const key = platformKey(p);
  const pkg = PACKAGES[key];
  if (!pkg) {
    return {
      error:
        `lb-sticky has no prebuilt lb for ${key} (there is one for ${Object.keys(PACKAGES).join(', ')}); ` +
        'build it from source (cargo build --release in a clone of lb) and set LB_BINARY=/path/to/lb',
    };
  }
  try {
    return { path: resolve(`${pkg}/bin/lb`) };
  } catch {
    return {
      error:
        `lb-sticky's binary package ${pkg} for ${key} is not installed ` +
        '(was the install run with --no-optional or --omit=optional?); install it: ' +
        `npm install ${pkg}, or set LB_BINARY=/path/to/lb`,
    };
  }
}

module.exports = { PACKAGES, platformKey, platformPackage, findBinary, libc };
