// A client of Historian's PostgreSQL protocol on Go's pgx driver, the driver inside
// Grafana's PostgreSQL data source. It runs the queries named on the command line and
// prints the results as JSON: column names, type OIDs and rows.
//
// Usage: go run main.go DSN MODE SQL [ARG...]   (MODE = simple | extended)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v4"
)

type result struct {
	Columns []string        `json:"columns"`
	OIDs    []uint32        `json:"oids"`
	Rows    [][]interface{} `json:"rows"`
	Error   string          `json:"error,omitempty"`
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: main DSN simple|extended SQL [ARG...]")
		os.Exit(2)
	}
	dsn, mode, sql := os.Args[1], os.Args[2], os.Args[3]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		out, _ := json.Marshal(result{Error: err.Error()})
		fmt.Println(string(out))
		return
	}
	defer conn.Close(ctx)
	args := []interface{}{}
	if mode == "simple" {
		args = append(args, pgx.QuerySimpleProtocol(true))
	}
	for _, a := range os.Args[4:] {
		args = append(args, a)
	}
	rows, err := conn.Query(ctx, sql, args...)
	res := result{Rows: [][]interface{}{}}
	if err == nil {
		for _, f := range rows.FieldDescriptions() {
			res.Columns = append(res.Columns, string(f.Name))
			res.OIDs = append(res.OIDs, f.DataTypeOID)
		}
		for rows.Next() {
			values, verr := rows.Values()
			if verr != nil {
				err = verr
				break
			}
			for i, v := range values {
				if t, ok := v.(time.Time); ok {
					values[i] = t.UTC().Format(time.RFC3339Nano)
				}
			}
			res.Rows = append(res.Rows, values)
		}
		if err == nil {
			err = rows.Err()
		}
		rows.Close()
	}
	if err != nil {
		res.Error = err.Error()
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}
