// The benchmarks' flags: `--name value` and `--name` alone.
const argv = process.argv.slice(2)

/** The value after --name, or dflt. */
export const opt = (name, dflt) => {
  const i = argv.indexOf(`--${name}`)
  return i >= 0 ? argv[i + 1] : dflt
}

/** --name was given. */
export const flag = (name) => argv.includes(`--${name}`)
