/** One GET on a fresh connection, its JSON body. */
import { get } from 'node:http'

export function getJson<T>(port: number, path: string, host = '127.0.0.1'): Promise<T> {
  return new Promise((resolve, reject) => {
    get({ host, port, path, agent: false }, (res) => {
      let body = ''
      res.on('data', (c) => (body += c))
      res.on('end', () => {
        try {
          resolve(JSON.parse(body))
        } catch (err) {
          reject(err)
        }
      })
    }).on('error', reject)
  })
}
