// autocannon ships no types (and @types/autocannon would be one more download): the tests use its result's fields
// as they check them.
declare module 'autocannon'
